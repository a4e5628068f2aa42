"""Split the rest of an epoch over ranks and DataLoader workers; account for what was consumed.

Pure functions of (samples left, batch size, world size, rank, workers, worker). Global batch
``g`` is the window ``[g*b*W, (g+1)*b*W)`` of the remaining order; rank ``r`` takes its ``r``-th
slice of ``b`` samples; the rank's batches go round-robin to its workers (batch ``k`` to worker
``k % num_workers``), which is the order in which a DataLoader collects them. So after every rank
has taken ``k`` batches the samples consumed are exactly the first ``k*b*W`` of the order, and a
run can resume from that count on any world size and worker count (mosaicml/streaming's
"elastic determinism": https://docs.mosaicml.com/projects/streaming/en/stable/distributed_training/elastic_determinism.html).
A last, partial global batch is split evenly over the ranks; with ``drop_last`` it is dropped so
every rank gets the same number of full batches (what DDP needs). Without it, a rank whose share
of that tail is empty finishes one step early, and a state it saves then counts the epoch as
finished: the other ranks' tail samples (fewer than one global batch) are not replayed.
"""

from __future__ import annotations

import numpy as np


def _check(n: int, batch_size: int, world_size: int, rank: int) -> None:
    if n < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"bad partition: n={n}, batch_size={batch_size}, world_size={world_size}, rank={rank}"
        )


def _layout(n: int, batch_size: int, world_size: int, rank: int, drop_last: bool):
    """(full global batches, tail start, tail stop) for `rank`."""
    _check(n, batch_size, world_size, rank)
    span = batch_size * world_size
    full = n // span
    tail = 0 if drop_last else n - full * span
    base = full * span
    return full, base + tail * rank // world_size, base + tail * (rank + 1) // world_size


def rank_count(n: int, *, batch_size: int, world_size: int, rank: int, drop_last: bool) -> int:
    """How many of the `n` remaining samples `rank` gets."""
    full, lo, hi = _layout(n, batch_size, world_size, rank, drop_last)
    return full * batch_size + hi - lo


def assigned(
    n: int,
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 1,
    worker: int = 0,
    drop_last: bool = False,
) -> np.ndarray:
    """Positions (into the remaining order) that `worker` of `rank` yields, in yield order."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"bad worker {worker} of {num_workers}")
    full, lo, hi = _layout(n, batch_size, world_size, rank, drop_last)
    batches = np.arange(worker, full, num_workers, dtype=np.int64)
    starts = batches * (batch_size * world_size) + rank * batch_size
    positions = (starts[:, None] + np.arange(batch_size, dtype=np.int64)).ravel()
    if hi > lo and full % num_workers == worker:
        positions = np.concatenate([positions, np.arange(lo, hi, dtype=np.int64)])
    return positions


def consumed(
    n: int, rank_processed: int, *, batch_size: int, world_size: int, rank: int, drop_last: bool
) -> int:
    """Samples of the `n` remaining consumed by all ranks once `rank` processed `rank_processed`.

    Ranks step together, so ``k`` batches on one rank mean ``k`` global batches. A finished rank
    means a finished epoch (``n``). One rank alone is exact to the sample; with several ranks a
    partly processed batch counts as processed (states are taken between batches).
    """
    total = rank_count(n, batch_size=batch_size, world_size=world_size, rank=rank,
                       drop_last=drop_last)
    if not 0 <= rank_processed <= total:
        raise ValueError(f"rank {rank} processed {rank_processed} of its {total} samples")
    if rank_processed == total:
        return n
    if world_size == 1:
        return rank_processed
    batches = -(-rank_processed // batch_size)
    return min(n, batches * batch_size * world_size)
