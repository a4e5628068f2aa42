"""The one check every count reader applies: raw counts are integers in 0..int32 max.

Corpus units store counts as ``list<int32>`` (DESIGN.md "Corpus layout"), so a fractional value
(normalised data, or a Matrix Market file declared ``integer`` that holds ``2.5``), a negative or
non-finite one, or one above int32 is refused, never truncated or wrapped. The error names the
file, where the first bad value is (a line, a row, or a unit and feature) and the value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from histmol.errors import BundleError

INT32_MAX = int(np.iinfo(np.int32).max)


def _why(value: float | int) -> str:
    if not np.isfinite(value):
        return "not a finite number"
    if value != np.round(value):
        return "not an integer (normalised data? raw counts are needed)"
    if value < 0:
        return "negative"
    return f"above the int32 maximum {INT32_MAX}"


def check_counts(values: np.ndarray, path: Path, where: Callable[[int], str]) -> np.ndarray:
    """`values` as int64 after checking each is an integer in 0..INT32_MAX.

    `where(i)` says where element i sits in `path` (e.g. ``"line 7"``); BundleError naming the
    file, that place and the value for the first bad element.
    """
    values = np.asarray(values)
    if values.dtype == bool:
        return values.astype(np.int64)
    if not np.issubdtype(values.dtype, np.number):
        raise BundleError(path, f"counts are not numeric (dtype {values.dtype})")
    if np.issubdtype(values.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.round(values))
    else:
        bad = np.zeros(values.shape, dtype=bool)
    if values.size:
        bad |= values < 0
        bad |= values > INT32_MAX
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = values.flat[i].item()
        raise BundleError(path, f"{where(i)}: count {value!r} is {_why(value)}")
    return values.astype(np.int64)
