"""Helpers shared by the adapters that bin sub-spot data into squares (seq-scope, hdst, open-st).

Those platforms measure at 0.5-2 um, far finer than a patch can use, so their units are square
bins of `bin_um` laid on the native frame from its origin (`histmol.binning`). The bins are
computed in micrometres and their centres handed back in the native frame's own unit.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from histmol.binning import BinnedCounts
from histmol.errors import ConfigError, WSIError
from histmol.wsi import open_wsi


def check_bin_um(bin_um: float) -> float:
    """Return `bin_um` as a float after checking it is a positive, finite side in um."""
    value = float(bin_um)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"bin_um must be a positive number of micrometres, got {bin_um!r}")
    return value


def binned_units(binned: BinnedCounts, um_per_native: float) -> pd.DataFrame:
    """Build the units table of the non-empty bins: ids `c{col}_r{row}`, native centres."""
    x_um, y_um = binned.centres_um()
    col = pd.Series(binned.col.astype(np.int64)).astype(str)
    row = pd.Series(binned.row.astype(np.int64)).astype(str)
    return pd.DataFrame(
        {
            "unit_id": ("c" + col + "_r" + row).to_numpy(object),
            "x_native": np.asarray(x_um / um_per_native, dtype=np.float64),
            "y_native": np.asarray(y_um / um_per_native, dtype=np.float64),
            "bin_col": binned.col.astype(np.int64),
            "bin_row": binned.row.astype(np.int64),
        }
    )


def image_um_per_px(wsi: str | os.PathLike[str], um_per_px: float | None) -> tuple[float, str]:
    """Return the H&E's um per level-0 pixel and its source ('user' or 'embedded').

    Why: HDST and Open-ST state positions in H&E pixels only, so laying `bin_um` bins needs the
    image's pixel size. The registration stage later cross-checks it against the bin pitch.
    """
    if um_per_px is not None:
        value = float(um_per_px)
        if not (math.isfinite(value) and 0.05 <= value <= 20):
            raise ConfigError(f"um_per_px must be in 0.05..20 um/px, got {um_per_px!r}")
        return value, "user"
    with open_wsi(wsi) as slide:
        mpp, reason = slide.embedded_mpp, slide.mpp_discard_reason
    if mpp is None:
        raise WSIError(
            wsi,
            f"states no usable pixel size ({reason or 'none recorded'}); the positions are in "
            "this image's pixels, so bins in micrometres need it: pass um_per_px",
        )
    return float(mpp), "embedded"
