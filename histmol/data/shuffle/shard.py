"""Shard-order shuffle: parts in a random order, samples of a part contiguous and in pair order.

The most local order (each part is read once, front to back) and the least random one; it is
also the first step of the block shuffle.
"""

from __future__ import annotations

import numpy as np


def part_of(part_starts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The part (row of `part_starts`) that each global sample id belongs to."""
    return np.searchsorted(part_starts, ids, side="right").astype(np.int64) - 1


def order(
    part_starts: np.ndarray, ids: np.ndarray, rng: np.random.Generator, block_size: int
) -> np.ndarray:
    """Group `ids` by part, parts in a random permutation, ids ascending inside a part."""
    del block_size
    n_parts = len(part_starts) - 1
    rank = np.empty(n_parts, dtype=np.int64)
    rank[rng.permutation(n_parts)] = np.arange(n_parts)
    ids = np.asarray(ids, dtype=np.int64)
    return ids[np.argsort(rank[part_of(part_starts, ids)], kind="stable")]
