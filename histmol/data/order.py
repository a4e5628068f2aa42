"""The epoch order, a pure function of the parts, mix, epoch size, shuffle, seed and epoch.

Inputs: part sizes, groups and weights, epoch size, shuffle, block size, seed, epoch. No I/O,
no world size, no worker count: every rank and worker computes the same array and takes its
own slice of it (`histmol.data.partition`), which makes resumption onto another world size exact.

Steps per epoch: for each mixing group, select its samples (`histmol.data.mixing.select`), put
them in shuffle order (`histmol.data.shuffle`: shard order, then blocks), then interleave the
groups by weight. Without mixing there is one group holding every part, and without an epoch
size every sample is selected exactly once. Generators are seeded with
``SeedSequence([seed, epoch, stream, group])``, so groups and steps draw independent numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histmol.data.mixing import group_targets, interleave, select
from histmol.data.shuffle import get_shuffle

_SELECT, _SHUFFLE = 0, 1


@dataclass(frozen=True)
class OrderSpec:
    """Everything an epoch order depends on besides the epoch number.

    `part_sizes` are the parts' pair counts in global order; `part_group` gives each part's mixing
    group (0..n_groups-1) or -1 when the part is left out; `weights` one positive weight per
    group; `epoch_size` None means "each selected part's pairs once".
    """

    part_sizes: tuple[int, ...]
    part_group: tuple[int, ...]
    weights: tuple[float, ...]
    epoch_size: int | None
    shuffle: str
    block_size: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.part_group) != len(self.part_sizes):
            raise ValueError("part_group and part_sizes differ in length")
        if any(s < 0 for s in self.part_sizes):
            raise ValueError("part sizes must be >= 0")
        if any(not -1 <= g < len(self.weights) for g in self.part_group):
            raise ValueError(f"part groups must lie in -1..{len(self.weights) - 1}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        get_shuffle(self.shuffle)

    @property
    def part_starts(self) -> np.ndarray:
        """Offsets of each part in the global sample id space (length n_parts + 1)."""
        return np.concatenate([[0], np.cumsum(self.part_sizes, dtype=np.int64)])

    def group_ids(self) -> list[np.ndarray]:
        """Global sample ids of each group, ascending."""
        sizes = np.asarray(self.part_sizes, dtype=np.int64)
        part_group = np.asarray(self.part_group, dtype=np.int64)
        if len(self.weights) == 1 and (part_group == 0).all():
            return [np.arange(int(sizes.sum()), dtype=np.int64)]
        return [np.flatnonzero(np.repeat(part_group == g, sizes)).astype(np.int64)
                for g in range(len(self.weights))]

    def epoch_length(self) -> int:
        """Samples per epoch."""
        if self.epoch_size is not None:
            return int(self.epoch_size)
        return sum(s for s, g in zip(self.part_sizes, self.part_group, strict=True) if g >= 0)


def _rng(spec: OrderSpec, epoch: int, stream: int, group: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([spec.seed, epoch, stream, group]))


def epoch_order(spec: OrderSpec, epoch: int) -> np.ndarray:
    """Global sample ids (int64) of `epoch` in order; length `spec.epoch_length()`."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    groups = spec.group_ids()
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    if spec.epoch_size is None and len(spec.weights) == 1:
        targets = sizes
    else:
        targets = group_targets(np.asarray(spec.weights), spec.epoch_length())
    shuffle = get_shuffle(spec.shuffle)
    starts = spec.part_starts
    streams = []
    for g, (ids, n) in enumerate(zip(groups, targets, strict=True)):
        chosen = ids if n == len(ids) else select(ids, int(n), _rng(spec, epoch, _SELECT, g))
        streams.append(shuffle(starts, chosen, _rng(spec, epoch, _SHUFFLE, g), spec.block_size))
    return interleave(streams)
