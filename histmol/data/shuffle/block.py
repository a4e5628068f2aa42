"""Block shuffle (mosaicml/streaming's ``py1b``): shard order, then shuffles inside blocks.

Shard-order shuffle, then shuffle samples inside consecutive blocks of `block_size` samples.

A block spans about ``block_size / pairs_per_part`` parts, so a reader works on a window of that
many parts at a time while samples from different sections mix within the window
(https://docs.mosaicml.com/projects/streaming/en/stable/dataset_configuration/shuffling.html).

Each block is sorted by its own random keys, a chunk of blocks at a time and in place, so the
memory beyond the order itself stays at one chunk (the keys are drawn from the generator chunk by
chunk: the same numbers as one draw of all of them).
"""

from __future__ import annotations

import numpy as np

from histmol.data.shuffle import shard

CHUNK_SAMPLES = 1 << 20  # samples sorted per step (rounded to whole blocks)


def order(
    part_starts: np.ndarray, ids: np.ndarray, rng: np.random.Generator, block_size: int
) -> np.ndarray:
    """Shard-order shuffle of `ids`, then a random permutation inside each block."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    ordered = shard.order(part_starts, ids, rng, block_size)
    step = max(1, CHUNK_SAMPLES // block_size) * block_size
    for start in range(0, len(ordered), step):
        chunk = ordered[start:start + step]
        keys = rng.random(len(chunk))
        full = len(chunk) // block_size * block_size
        if full:
            rows = np.argsort(keys[:full].reshape(-1, block_size), axis=1, kind="stable")
            rows += np.arange(0, full, block_size, dtype=np.int64)[:, None]
            chunk[:full] = chunk[:full][rows.ravel()]
        if full < len(chunk):
            tail = full + np.argsort(keys[full:], kind="stable")
            chunk[full:] = chunk[tail]
    return ordered
