"""CosMx frames: fov positions, export layout, pixel size, and local vs global pixels.

Two export layouts exist. Legacy (the 2022 NSCLC release, AtoMx < 1.3.2): fov positions
`fov, x_global_px, y_global_px`; global = fov position + local on both axes, local y counted
up from the bottom of the FOV image (checked on the Lung12 fixture: transcripts fall in their
cell of CellLabels at row 3648 - y_local_px, not at row y_local_px). AtoMx SIP >= 1.3.2:
fov positions `FOV, x_global_px, y_global_px, x_global_mm, y_global_mm`; x_global = x_fov +
x_local but y_global = y_fov - y_local (the polygons example of NanoString's "Comparing AtoMx SIP
flat files with the legacy format"). In both the global frame is Cartesian, y up (SMI ReadMe:
"For global coordinates, the origin (0,0) is the bottom left"). Global columns are used where a
file has them; the relation is then measured per FOV, which catches swapped or corrupted axes.

Pixel size: 0.12028 um/px on commercial instruments (AtoMx docs; spatialdata-io uses
0.120280945), 0.18 um/px on the prototype "Dash" instrument of the NSCLC release, whose FOVs are
5472 x 3648 px (NanoString, CosMx-Analysis-Scratch-Space issue #108).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from histmol.errors import BundleError
from platform_adapters._common import require_columns

COMMERCIAL_UM_PER_PX = 0.12028
DASH_UM_PER_PX = 0.18
COMMERCIAL_FOV_PX = 4256  # FOV side of commercial instruments
AXIS_TOLERANCE_PX = 2.0  # AtoMx globals carry sub-pixel registration, locals are rounded
QC = dict[str, float | int | str | bool]


class CosmxKeys(StrEnum):
    """Column names; `FOV_UPPER` is the AtoMx >= 1.3.2 spelling in the fov positions file."""

    FOV = "fov"
    FOV_UPPER = "FOV"
    CELL_ID = "cell_ID"
    AREA = "Area"
    CENTER_X_LOCAL = "CenterX_local_px"
    CENTER_Y_LOCAL = "CenterY_local_px"
    CENTER_X_GLOBAL = "CenterX_global_px"
    CENTER_Y_GLOBAL = "CenterY_global_px"
    X_GLOBAL_PX = "x_global_px"  # fov positions and transcripts
    Y_GLOBAL_PX = "y_global_px"
    X_GLOBAL_MM = "x_global_mm"
    Y_GLOBAL_MM = "y_global_mm"
    X_LOCAL_PX = "x_local_px"
    TARGET = "target"


def read_fov_positions(path: Path) -> pd.DataFrame:
    """FOV positions indexed by fov: x_px, y_px and, in AtoMx >= 1.3.2 files, x_mm, y_mm."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as CSV: {err}") from err
    keys = CosmxKeys
    fov = keys.FOV_UPPER if keys.FOV_UPPER in frame.columns else keys.FOV
    require_columns(
        frame,
        [str(fov), keys.X_GLOBAL_PX.value, keys.Y_GLOBAL_PX.value],
        path,
        "fov positions table",
    )
    columns = {
        fov: "fov",
        keys.X_GLOBAL_PX: "x_px",
        keys.Y_GLOBAL_PX: "y_px",
        keys.X_GLOBAL_MM: "x_mm",
        keys.Y_GLOBAL_MM: "y_mm",
    }
    table = frame[[c for c in columns if c in frame.columns]].rename(columns=columns)
    table = table.apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(table.to_numpy(np.float64)).all():
        raise BundleError(path, "fov positions hold non-numeric or missing values")
    if table["fov"].duplicated().any():
        raise BundleError(
            path, f"duplicate FOVs {table['fov'][table['fov'].duplicated()].tolist()}"
        )
    return table.astype({"fov": np.int64}).set_index("fov")


def layout_of(fovs: pd.DataFrame | None) -> str:
    if fovs is None:
        return "unknown"
    return "atomx" if "x_mm" in fovs.columns else "legacy"


def pixel_size(
    user: float | None, fovs: pd.DataFrame | None, local_x_max: float | None, qc: QC
) -> float:
    """Micrometres per CosMx pixel, recording the value and its source in `qc`."""
    if user is not None:
        value, source = float(user), "user"
    elif fovs is not None and "x_mm" in fovs.columns:
        px = fovs[["x_px", "y_px"]].to_numpy(np.float64).ravel()
        mm = fovs[["x_mm", "y_mm"]].to_numpy(np.float64).ravel()
        ratio = float(1000.0 * (mm @ px) / (px @ px)) if (px @ px) > 0 else COMMERCIAL_UM_PER_PX
        qc["fov_positions_um_per_px"] = ratio
        close = abs(ratio / COMMERCIAL_UM_PER_PX - 1.0) <= 0.01
        value, source = (
            (COMMERCIAL_UM_PER_PX, "fov_positions_mm")
            if close
            else (ratio, "fov_positions_mm_ratio")
        )
    elif local_x_max is not None and local_x_max > COMMERCIAL_FOV_PX + 16:
        value, source = DASH_UM_PER_PX, "dash_fov_width"
    else:
        value, source = COMMERCIAL_UM_PER_PX, "commercial_default"
    qc.update(px_size_um=value, px_size_source=source)
    return value


def cell_centres(
    cells: pd.DataFrame, fovs: pd.DataFrame | None, path: Path, qc: QC
) -> tuple[np.ndarray, np.ndarray]:
    """Global pixel centres, checked against (or, without globals, built from) local ones."""
    keys = CosmxKeys
    fov = cells[keys.FOV].to_numpy(np.int64)
    has_local = keys.CENTER_X_LOCAL in cells and keys.CENTER_Y_LOCAL in cells
    if keys.CENTER_X_GLOBAL in cells and keys.CENTER_Y_GLOBAL in cells:
        x = cells[keys.CENTER_X_GLOBAL].to_numpy(np.float64)
        y = cells[keys.CENTER_Y_GLOBAL].to_numpy(np.float64)
        if has_local:
            x_local = cells[keys.CENTER_X_LOCAL].to_numpy(np.float64)
            y_local = cells[keys.CENTER_Y_LOCAL].to_numpy(np.float64)
            sx = _axis_sign(fov, x_local, x, path, keys.CENTER_X_GLOBAL)
            sy = _axis_sign(fov, y_local, y, path, keys.CENTER_Y_GLOBAL)
            qc.update(global_x_sign=sx, global_y_sign=sy)
            if qc["layout"] == "unknown":  # no fov positions file: the y relation tells
                qc["layout"] = "legacy" if sy > 0 else "atomx"
            if fovs is not None:
                qc["fov_positions_max_offset_px"] = _fov_offset(
                    fovs, fov, x - sx * x_local, y - sy * y_local
                )
        qc["centres_source"] = "metadata_global"
        return x, y
    if fovs is None:
        raise BundleError(
            path,
            f"lacks {keys.CENTER_X_GLOBAL}/{keys.CENTER_Y_GLOBAL} and there is "
            "no *_fov_positions_file.csv to place its local coordinates",
        )
    missing = sorted(set(fov) - set(fovs.index))
    if missing:
        raise BundleError(path, f"FOVs {missing[:5]} have no row in the fov positions file")
    sy = -1.0 if "x_mm" in fovs.columns else 1.0  # AtoMx >= 1.3.2: y_global = y_fov - y_local
    qc.update(global_x_sign=1.0, global_y_sign=sy, centres_source="fov_positions_plus_local")
    x = fovs["x_px"].reindex(fov).to_numpy() + cells[keys.CENTER_X_LOCAL].to_numpy(np.float64)
    y = fovs["y_px"].reindex(fov).to_numpy() + sy * cells[keys.CENTER_Y_LOCAL].to_numpy(np.float64)
    return x, y


def _axis_sign(
    fov: np.ndarray, local: np.ndarray, global_: np.ndarray, path: Path, column: str
) -> float:
    """+1 when global = offset + local in every FOV, -1 when global = offset - local."""
    frame = pd.DataFrame({"fov": fov, "minus": global_ - local, "plus": global_ + local})
    spread = frame.groupby("fov").agg(["min", "max"])
    for sign, name in ((1.0, "minus"), (-1.0, "plus")):
        if ((spread[(name, "max")] - spread[(name, "min")]) <= AXIS_TOLERANCE_PX).all():
            return sign
    worst = (spread[("minus", "max")] - spread[("minus", "min")]).idxmax()
    raise BundleError(
        path,
        f"{column} is not a translation of its local coordinate within each FOV (e.g. fov "
        f"{worst}): global and local axes disagree; swapped or flipped columns?",
    )


def _fov_offset(fovs: pd.DataFrame, fov: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> float:
    """Largest distance (px) between a FOV's offset implied by the cells and its listed position."""
    known = np.isin(fov, fovs.index)
    if not known.any():
        return float("nan")
    dx = x0[known] - fovs["x_px"].reindex(fov[known]).to_numpy()
    dy = y0[known] - fovs["y_px"].reindex(fov[known]).to_numpy()
    return float(np.abs(np.concatenate([dx, dy])).max())
