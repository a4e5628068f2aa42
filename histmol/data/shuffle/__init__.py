"""Sample shuffles: pure functions of (part layout, selected samples, rng, block size).

Each variant lives in its own module and is chosen by name from `SHUFFLES` (the layout of
mosaicml/streaming's ``streaming/base/shuffle/``). A shuffle receives the selected global sample
ids sorted ascending (repeats allowed when an epoch oversamples), the parts' start offsets in the
global id space and a seeded generator, and returns the same multiset in epoch order. None of them
does any I/O, so they are tested on plain arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from histmol.data.shuffle import block, none, shard
from histmol.errors import ConfigError

ShuffleFn = Callable[[np.ndarray, np.ndarray, np.random.Generator, int], np.ndarray]

SHUFFLES: dict[str, ShuffleFn] = {
    "none": none.order,
    "shard": shard.order,
    "block": block.order,
}


def get_shuffle(name: str) -> ShuffleFn:
    """The shuffle registered as `name`; ConfigError listing the valid names otherwise."""
    try:
        return SHUFFLES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown shuffle {name!r}; one of {sorted(SHUFFLES)}") from None
