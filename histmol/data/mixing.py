"""Mixing: samples per group (platform, tissue, section or corpus), which ones, and interleaving.

How many samples each group gets in an epoch, which samples those are, and how the groups'
sample streams are interleaved.

Pure functions of sizes, weights, epoch size and a seeded generator. The interleave is a
deterministic weighted merge (item ``i`` of a group of ``n`` items sits at ``(i + 0.5) / n``), so
every contiguous window of the epoch order, and so every batch, holds each group in proportion to
its weight to within 2 samples, while each group's own stream keeps its shard-local order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import inf

import numpy as np

from histmol.errors import ConfigError

MIX_KEYS = ("platform", "tissue", "section", "corpus")


def group_targets(weights: np.ndarray, epoch_size: int) -> np.ndarray:
    """Samples per group: ``epoch_size * w / sum(w)``, largest remainder (sums exactly)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not len(weights) or not ((weights > 0) & np.isfinite(weights)).all():
        raise ValueError(f"group weights must be a non-empty vector of positive numbers: {weights}")
    if epoch_size < 0:
        raise ValueError(f"epoch_size must be >= 0, got {epoch_size}")
    exact = epoch_size * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    short = int(epoch_size - counts.sum())
    if short:
        # Largest remainder first; ties go to the lower group index (stable sort).
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def select(ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples from a group's sample ids: whole passes, then a random subset, sorted ascending.

    Every id appears ``n // len(ids)`` or ``n // len(ids) + 1`` times, so no sample repeats while
    another of its group is unused.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if n and not len(ids):
        raise ValueError(f"cannot draw {n} samples from an empty group")
    if not n:
        return np.empty(0, dtype=np.int64)
    full, rest = divmod(n, len(ids))
    parts = [np.tile(ids, full)] if full else []
    if rest:
        parts.append(ids[rng.choice(len(ids), size=rest, replace=False)])
    return np.sort(np.concatenate(parts), kind="stable")


def interleave(streams: Sequence[np.ndarray]) -> np.ndarray:
    """Merge ordered streams so each stream is spread evenly over the result (order kept inside)."""
    streams = [np.asarray(s, dtype=np.int64) for s in streams]
    if len(streams) == 1:
        return streams[0]
    keys = np.concatenate([(np.arange(len(s)) + 0.5) / max(len(s), 1) for s in streams])
    group = np.concatenate([np.full(len(s), g, dtype=np.int64) for g, s in enumerate(streams)])
    merged = np.concatenate(streams)
    return merged[np.lexsort((group, keys))]


def assign_groups(
    values: Sequence[str], weights: Mapping[str, float], key: str
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Mixing group of each part (-1: weight 0, left out) and the groups' weights.

    `values` holds each part's value of the mixing key (its platform, tissue, ...). Every value
    present needs a weight (0 leaves it out) and every weight a value present, so a typo or a
    corpus that gained a platform is an error rather than a silent change of the mix.
    """
    present = sorted(set(values))
    unweighted = [v for v in present if v not in weights]
    absent = sorted(set(weights) - set(present))
    if unweighted or absent:
        raise ConfigError(
            f"mix by {key!r}: "
            + (f"no weight for {unweighted} (give 0 to leave them out)" if unweighted else "")
            + ("; " if unweighted and absent else "")
            + (f"weights for {absent}, which no corpus holds" if absent else "")
            + f"; present: {present}"
        )
    bad = {k: w for k, w in weights.items()
           if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0 or w == inf}
    if bad:
        raise ConfigError(f"mix by {key!r}: weights must be finite numbers >= 0, got {bad}")
    kept = [v for v in present if weights[v] > 0]
    if not kept:
        raise ConfigError(f"mix by {key!r}: every weight is 0")
    group = {v: i for i, v in enumerate(kept)}
    return tuple(group.get(v, -1) for v in values), tuple(float(weights[v]) for v in kept)
