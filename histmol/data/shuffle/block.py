"""Block shuffle (mosaicml/streaming's ``py1b``): shard order, then shuffles inside blocks.

Shard-order shuffle, then shuffle samples inside consecutive blocks of `block_size` samples.

A block spans about ``block_size / pairs_per_part`` parts, so a reader works on a window of that
many parts at a time while samples from different sections mix within the window
(https://docs.mosaicml.com/projects/streaming/en/stable/dataset_configuration/shuffling.html).
"""

from __future__ import annotations

import numpy as np

from histmol.data.shuffle import shard


def order(
    part_starts: np.ndarray, ids: np.ndarray, rng: np.random.Generator, block_size: int
) -> np.ndarray:
    """Shard-order shuffle of `ids`, then a random permutation inside each block."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    ordered = shard.order(part_starts, ids, rng, block_size)
    blocks = np.arange(len(ordered), dtype=np.int64) // block_size
    keys = rng.random(len(ordered))
    return ordered[np.lexsort((keys, blocks))]
