"""Shard-order shuffle: parts in a random order, samples of a part contiguous and in pair order.

The most local order (each part is read once, front to back) and the least random one; it is
also the first step of the block shuffle.

The ids arrive sorted, so a part's ids are one contiguous slice of them: the result is those
slices in the parts' random order, gathered in one pass (no sort over the samples: at 50 M pairs
a sort took minutes and gigabytes).
"""

from __future__ import annotations

import numpy as np


def part_of(part_starts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The part (row of `part_starts`) that each global sample id belongs to."""
    return np.searchsorted(part_starts, ids, side="right").astype(np.int64) - 1


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ranges ``starts[i] .. starts[i] + lengths[i] - 1`` concatenated, as one int64 array."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths, dtype=np.int64)
    out = np.ones(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    nonempty = lengths > 0
    heads = (ends - lengths)[nonempty]
    if len(heads):
        first = np.asarray(starts, dtype=np.int64)[nonempty]
        previous_last = np.concatenate([[0], (first + lengths[nonempty] - 1)[:-1]])
        out[heads] = first - previous_last
        out[0] = first[0]
    return np.cumsum(out, out=out)


def order(
    part_starts: np.ndarray, ids: np.ndarray, rng: np.random.Generator, block_size: int
) -> np.ndarray:
    """Group `ids` (sorted ascending) by part, parts in a random permutation, ids ascending."""
    del block_size
    n_parts = len(part_starts) - 1
    permutation = rng.permutation(n_parts)  # part permutation[i] goes i-th
    ids = np.asarray(ids, dtype=np.int64)
    bounds = np.searchsorted(ids, part_starts, side="left")
    firsts, counts = bounds[:-1][permutation], np.diff(bounds)[permutation]
    if len(ids) and len(ids) == int(ids[-1] - ids[0]) + 1:  # every id once: the ids themselves
        return ragged_arange(firsts + ids[0], counts)
    return ids[ragged_arange(firsts, counts)]
