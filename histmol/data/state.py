"""Resume state: a handful of numbers, with the order recomputed on load (as in mosaicml/streaming).

A reading process (the main process, or one DataLoader worker) reports ``epoch``, ``start`` (the
samples of the epoch order consumed before this pass), where it sits in the partition (``rank``,
``world_size``, ``worker``, ``num_workers``, ``batch_size``, ``drop_last``) and ``position`` (how
many of its assigned samples it has yielded or skipped). A torchdata ``StatefulDataLoader`` keeps
one such state per worker. `rank_progress` turns a loader's state (or one process' state) into the
epoch and the number of samples of the epoch order consumed by all ranks, from which any world
size and worker count can continue (`histmol.data.partition.consumed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from histmol.data.partition import consumed, rank_count

STATE_FORMAT = "histmol.PairDataset"
STATE_VERSION = 1
PARTITION_KEYS = ("rank", "world_size", "worker", "num_workers", "batch_size", "drop_last")
_SHARED_KEYS = ("fingerprint", "epoch", "start", "rank", "world_size", "num_workers",
                "batch_size", "drop_last")


def is_process_state(state: Mapping[str, Any]) -> bool:
    """True for a state written by PairDataset.state_dict (one process)."""
    return state.get("format") == STATE_FORMAT


def process_states(state: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], int]:
    """The per-process dataset states inside a state, and batches yielded after their snapshot.

    Accepts a PairDataset state, a single-process StatefulDataLoader state (``dataset_state``)
    or a multi-process one (``_snapshot._worker_snapshots.*.dataset_state``).
    """
    if is_process_state(state):
        return [state], 0
    if "_snapshot" in state:
        workers = state["_snapshot"].get("_worker_snapshots") or {}
        states = [w.get("dataset_state") for w in workers.values()]
        extra = int(state.get("_steps_since_snapshot") or 0)
    elif "dataset_state" in state:
        states, extra = [state["dataset_state"]], 0
    else:
        raise ValueError("not a PairDataset or StatefulDataLoader state dict")
    if not states or not all(isinstance(s, Mapping) and is_process_state(s) for s in states):
        raise ValueError("the loader state holds no PairDataset state for every worker")
    return states, extra


def rank_progress(
    state: Mapping[str, Any], epoch_length: int, fingerprint: str
) -> tuple[int, int]:
    """(epoch, samples of that epoch's order consumed by all ranks) from a saved state."""
    states, extra_batches = process_states(state)
    first = states[0]
    if first.get("version") != STATE_VERSION:
        raise ValueError(
            f"state version {first.get('version')!r}; this loader reads {STATE_VERSION}"
        )
    for other in states[1:]:
        differing = [k for k in _SHARED_KEYS if other.get(k) != first.get(k)]
        if differing:
            raise ValueError(f"worker states disagree on {differing}")
    if first["fingerprint"] != fingerprint:
        raise ValueError(
            "the state was saved over other corpora contents or order options (seed, shuffle, "
            "block size, mix, epoch size): its order cannot be recomputed"
        )
    workers = sorted(int(s["worker"]) for s in states)
    if workers != list(range(int(first["num_workers"]))):
        raise ValueError(f"state covers workers {workers} of {first['num_workers']}: pass the "
                         "whole loader state, not one worker's")
    processed = sum(int(s["position"]) for s in states) + extra_batches * int(first["batch_size"])
    start = int(first["start"])
    layout = {"batch_size": int(first["batch_size"]), "world_size": int(first["world_size"]),
              "rank": int(first["rank"]), "drop_last": bool(first["drop_last"])}
    processed = min(processed, rank_count(epoch_length - start, **layout))
    done = start + consumed(epoch_length - start, processed, **layout)
    epoch = int(first["epoch"])
    return (epoch + 1, 0) if done >= epoch_length else (epoch, done)
