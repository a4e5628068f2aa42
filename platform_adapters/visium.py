"""10x Genomics Visium (Space Ranger) adapter.

Reads a Space Ranger `outs/` folder (or the folder holding it):

- `spatial/tissue_positions.csv` (Space Ranger >= 2.0, with a header) or
  `spatial/tissue_positions_list.csv` (Space Ranger 1.x, no header; some tools rewrite it with a
  header, scverse/spatialdata-io issue #146, which is detected). Columns, in order: barcode,
  in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres.
- `spatial/scalefactors_json.json` (required): tissue_hires_scalef, tissue_lowres_scalef,
  fiducial_diameter_fullres, spot_diameter_fullres (+ regist_target_img_scalef with CytAssist).
- the counts: `filtered_feature_bc_matrix.h5`, else the `filtered_feature_bc_matrix/` MEX folder,
  else `raw_feature_bc_matrix.h5` / `raw_feature_bc_matrix/` restricted to in_tissue == 1 spots.
- `spatial/cytassist_image.tiff` is only looked at: its presence marks a CytAssist bundle.

Native frame: full-resolution image pixels, `x_native = pxl_col_in_fullres` (x is the column),
`y_native = pxl_row_in_fullres`. Format docs: Space Ranger "Spatial Outputs" and
"Feature-Barcode Matrices" (https://www.10xgenomics.com/support/software/space-ranger/latest/
analysis/outputs/spatial-outputs); reference reader: scverse/spatialdata-io `readers/visium.py`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from histmol.errors import BundleError
from histmol.section import ArrayLattice, Section
from platform_adapters._common import (
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    inner_join_ids,
    panel_section,
    require_columns,
)
from platform_adapters._tenx import GENE_EXPRESSION, read_10x_matrix, read_scalefactors

PLATFORM = "visium"
ADAPTER_VERSION = "1"

SPOT_DIAMETER_UM = 55.0  # Visium v1/v2 capture spot diameter
SPOT_PITCH_UM = 100.0  # centre-to-centre distance
# Space Ranger's `spot_diameter_fullres` is "the number of pixels that span the diameter of a
# theoretical 65 um spot in the original, full-resolution image" (Space Ranger 1.3 docs, output
# "images"), not of the 55 um capture spot. Checked on the visium_seurat fixture: 100 um pitch
# (array_col step 2) spans 137.5 px = 100 um x 89.47 px / 65 um; with 55 um it would be 84.6 um.
SPOT_DIAMETER_FULLRES_UM = 65.0


class VisiumFiles(StrEnum):
    """Space Ranger file names, relative to `outs/`."""

    SPATIAL_DIR = "spatial"
    POSITIONS_V2 = "spatial/tissue_positions.csv"  # Space Ranger >= 2.0, header row
    POSITIONS_V1 = "spatial/tissue_positions_list.csv"  # Space Ranger 1.x, no header
    SCALEFACTORS = "spatial/scalefactors_json.json"
    LOWRES_IMAGE = "spatial/tissue_lowres_image.png"
    HIRES_IMAGE = "spatial/tissue_hires_image.png"
    CYTASSIST_IMAGE = "spatial/cytassist_image.tiff"  # Space Ranger >= 2.0 with CytAssist
    FILTERED_H5 = "filtered_feature_bc_matrix.h5"
    FILTERED_MEX = "filtered_feature_bc_matrix"
    RAW_H5 = "raw_feature_bc_matrix.h5"
    RAW_MEX = "raw_feature_bc_matrix"


class VisiumKeys(StrEnum):
    """Column and scale-factor keys."""

    BARCODE = "barcode"
    IN_TISSUE = "in_tissue"
    ARRAY_ROW = "array_row"
    ARRAY_COL = "array_col"
    PXL_ROW = "pxl_row_in_fullres"  # y
    PXL_COL = "pxl_col_in_fullres"  # x
    SPOT_DIAMETER_FULLRES = "spot_diameter_fullres"
    HIRES_SCALEF = "tissue_hires_scalef"
    LOWRES_SCALEF = "tissue_lowres_scalef"


# The hexagonal array: same-row neighbours are 2 array columns (100 um) apart, rows
# 100 * sqrt(3) / 2 um apart. Registration reads the exact pixel size off these indices.
LATTICE = ArrayLattice(
    VisiumKeys.ARRAY_COL.value, VisiumKeys.ARRAY_ROW.value,
    SPOT_PITCH_UM / 2, SPOT_PITCH_UM * np.sqrt(3) / 2,
)

POSITION_COLUMNS = (
    VisiumKeys.BARCODE,
    VisiumKeys.IN_TISSUE,
    VisiumKeys.ARRAY_ROW,
    VisiumKeys.ARRAY_COL,
    VisiumKeys.PXL_ROW,
    VisiumKeys.PXL_COL,
)
MATRIX_CANDIDATES = (
    VisiumFiles.FILTERED_H5,
    VisiumFiles.FILTERED_MEX,
    VisiumFiles.RAW_H5,
    VisiumFiles.RAW_MEX,
)


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    counts: str | os.PathLike[str] | None = None,
    positions: str | os.PathLike[str] | None = None,
) -> Section:
    """Read a Space Ranger Visium bundle into a Section in full-resolution pixel coordinates.

    Args:
        bundle: the Space Ranger `outs/` folder, or a folder holding `outs/`.
        wsi: the H&E image the full-resolution pixels refer to (not opened here). When it is the
            bundle's own `tissue_lowres_image.png` / `tissue_hires_image.png`, `native_to_wsi`
            becomes diag(scalef, scalef, 1) with the matching scale factor.
        section_id: defaults to the slug of the bundle folder (the parent's name for `outs/`).
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of matrix barcodes that must have a position.
        native_to_wsi: explicit 3x3 affine; wins over the lowres/hires rule.
        counts: override the matrix (a 10x `.h5` file or a MEX folder); `raw_*` names are
            restricted to in-tissue spots like the autodetected raw matrix.
        positions: override the positions CSV.

    Raises:
        BundleError: a missing or malformed file, or a barcode match rate under the threshold.
    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    folder = bundle_folder(bundle)
    outs = _outs_folder(folder)
    positions_file, positions_version = _positions_file(outs, positions)
    scalefactors_file = outs / VisiumFiles.SCALEFACTORS
    if not scalefactors_file.exists():
        raise BundleError(scalefactors_file, "missing; Visium bundles need the scale factors JSON")
    matrix_path = explicit_file(counts, "count matrix") if counts else _matrix_path(outs)
    is_raw = matrix_path.name.startswith("raw_")

    scalefactors = _read_scalefactors(scalefactors_file)
    spots = _read_positions(positions_file)
    matrix = read_10x_matrix(matrix_path)
    n_features = len(matrix.feature_ids)
    matrix = matrix.only_feature_type(GENE_EXPRESSION)

    join = inner_join_ids(
        matrix.barcodes,
        spots[VisiumKeys.BARCODE].to_numpy(),
        matrix_file=matrix_path,
        positions_file=positions_file,
        min_match_rate=min_match_rate,
    )
    rows = join.matrix_index
    placed = spots.iloc[join.positions_index].reset_index(drop=True)
    if is_raw:
        in_tissue = (placed[VisiumKeys.IN_TISSUE] == 1).to_numpy()
        rows, placed = rows[in_tissue], placed.loc[in_tissue].reset_index(drop=True)
        if len(rows) == 0:
            raise BundleError(positions_file, f"no spot of {matrix_path.name} is in tissue")
    panel = build_gene_panel(
        matrix.feature_ids, matrix.feature_names, matrix.counts[rows]
    )
    units = pd.DataFrame(
        {
            "unit_id": placed[VisiumKeys.BARCODE].astype(str).to_numpy(object),
            "x_native": placed[VisiumKeys.PXL_COL].to_numpy(np.float64),
            "y_native": placed[VisiumKeys.PXL_ROW].to_numpy(np.float64),
            "array_row": placed[VisiumKeys.ARRAY_ROW].to_numpy(np.int32),
            "array_col": placed[VisiumKeys.ARRAY_COL].to_numpy(np.int32),
            "in_tissue": placed[VisiumKeys.IN_TISSUE].to_numpy(np.int8),
        }
    )
    native_um_per_unit = SPOT_DIAMETER_FULLRES_UM / scalefactors[VisiumKeys.SPOT_DIAMETER_FULLRES]
    cytassist = (outs / VisiumFiles.CYTASSIST_IMAGE).exists()
    files = [positions_file, scalefactors_file, matrix_path]
    qc: dict[str, float | int | str | bool] = {
        f"scalefactor_{key}": value for key, value in scalefactors.items()
    }
    qc.update(
        positions_format=positions_version,
        matrix_source=matrix_path.name,
        matrix_is_raw=is_raw,
        n_matrix_barcodes=join.n_matrix,
        n_matched_barcodes=join.n_matched,
        barcode_match_rate=join.match_rate,
        n_position_rows=len(spots),
        n_positions_in_tissue=int((spots[VisiumKeys.IN_TISSUE] == 1).sum()),
        n_features_not_gene_expression=n_features - len(matrix.feature_ids),
        n_control_probes=panel.n_controls,
        cytassist=cytassist,
    )
    pitch_px = _array_pitch_px(spots)
    if pitch_px is not None:
        qc["pitch_px_from_positions"] = pitch_px
        qc["pitch_um_from_positions"] = pitch_px * native_um_per_unit
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=units,
        panel=panel,
        files=files,
        layout="cytassist" if cytassist else "standard",
        metadata=metadata,
        unit_shape="circle",
        unit_size_um=SPOT_DIAMETER_UM,
        pitch_um=SPOT_PITCH_UM,
        default_mode="spot",
        native_to_wsi=(
            explicit if explicit is not None else _bundle_image_transform(outs, wsi, scalefactors)
        ),
        native_um_per_unit=native_um_per_unit,
        array_lattice=LATTICE,
        qc=qc,
    )


def _outs_folder(folder: Path) -> Path:
    """`folder` itself when it holds `spatial/`, else its `outs/` child when that does."""
    if (folder / VisiumFiles.SPATIAL_DIR).is_dir():
        return folder
    if (folder / "outs" / VisiumFiles.SPATIAL_DIR).is_dir():
        return folder / "outs"
    raise BundleError(
        folder,
        "not a Space Ranger output: no 'spatial/' folder here or in 'outs/' (looked for "
        f"{VisiumFiles.POSITIONS_V2}, {VisiumFiles.POSITIONS_V1}, {VisiumFiles.SCALEFACTORS})",
    )


def _positions_file(outs: Path, override: str | os.PathLike[str] | None) -> tuple[Path, str]:
    if override is not None:
        path = explicit_file(override, "positions file")
        return path, "explicit"
    v2, v1 = outs / VisiumFiles.POSITIONS_V2, outs / VisiumFiles.POSITIONS_V1
    if v2.exists():
        return v2, "spaceranger>=2.0"
    if v1.exists():
        return v1, "spaceranger1"
    raise BundleError(
        outs / VisiumFiles.SPATIAL_DIR,
        f"no spot positions file; looked for {VisiumFiles.POSITIONS_V2} (Space Ranger >= 2.0) "
        f"and {VisiumFiles.POSITIONS_V1} (Space Ranger 1.x)",
    )


def _matrix_path(outs: Path) -> Path:
    for candidate in MATRIX_CANDIDATES:
        path = outs / candidate
        if path.exists():
            return path
    # Some pipelines prefix the library id: <library>_filtered_feature_bc_matrix.h5.
    prefixed = sorted(outs.glob(f"*_{VisiumFiles.FILTERED_H5}"))
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        names = [p.name for p in prefixed]
        raise BundleError(outs, f"several candidate matrices {names}; pass counts= to choose")
    raise BundleError(
        outs, f"no count matrix; looked for {', '.join(MATRIX_CANDIDATES)} (h5 file or MEX folder)"
    )


def _read_scalefactors(path: Path) -> dict[str, float]:
    values = read_scalefactors(path)
    needed = [VisiumKeys.SPOT_DIAMETER_FULLRES, VisiumKeys.HIRES_SCALEF, VisiumKeys.LOWRES_SCALEF]
    missing = [k.value for k in needed if k not in values]
    if missing:
        raise BundleError(path, f"lacks numeric keys {missing}; found {sorted(values)}")
    if not values[VisiumKeys.SPOT_DIAMETER_FULLRES] > 0:
        raise BundleError(path, "spot_diameter_fullres must be positive")
    return values


def _read_positions(path: Path) -> pd.DataFrame:
    expected = [c.value for c in POSITION_COLUMNS]
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as CSV: {err}") from err
    if raw.empty:
        raise BundleError(path, "positions table is empty")
    header = raw.iloc[0].astype(str).str.strip().tolist()
    if VisiumKeys.IN_TISSUE.value in header:  # Space Ranger >= 2.0, or a 1.x file given a header
        frame = raw.iloc[1:].reset_index(drop=True)
        frame.columns = header
        require_columns(frame, expected, path, "positions table")
        frame = frame[expected].copy()
    elif any(h.isidentifier() for h in header[1:]):
        raise BundleError(
            path,
            f"positions header lacks columns {sorted(set(expected) - set(header))}; found columns "
            f"{header}, expected {expected}",
        )
    else:
        if raw.shape[1] != len(expected):
            raise BundleError(
                path,
                f"headerless positions table has {raw.shape[1]} columns, expected "
                f"{len(expected)}: {expected}",
            )
        frame = raw.copy()
        frame.columns = expected
    frame[VisiumKeys.BARCODE] = frame[VisiumKeys.BARCODE].astype(str)
    numeric = expected[1:]
    converted = frame[numeric].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in numeric if converted[c].isna().any() or not np.isfinite(converted[c]).all()]
    if bad:
        raise BundleError(path, f"columns {bad} hold non-numeric or missing values")
    frame[numeric] = converted
    if not frame[VisiumKeys.IN_TISSUE].isin([0, 1]).all():
        raise BundleError(path, "in_tissue must be 0 or 1")
    return frame


def _array_pitch_px(spots: pd.DataFrame) -> float | None:
    """Median full-res pixel distance between same-row neighbours two array columns apart."""
    keys = [VisiumKeys.ARRAY_ROW, VisiumKeys.ARRAY_COL, VisiumKeys.PXL_ROW, VisiumKeys.PXL_COL]
    left = spots[keys]
    right = left.assign(**{VisiumKeys.ARRAY_COL: left[VisiumKeys.ARRAY_COL] - 2})
    pairs = left.merge(right, on=[VisiumKeys.ARRAY_ROW, VisiumKeys.ARRAY_COL], suffixes=("", "_n"))
    if pairs.empty:
        return None
    dist = np.hypot(
        pairs[f"{VisiumKeys.PXL_ROW}_n"] - pairs[VisiumKeys.PXL_ROW],
        pairs[f"{VisiumKeys.PXL_COL}_n"] - pairs[VisiumKeys.PXL_COL],
    )
    return float(np.median(dist))


def _bundle_image_transform(
    outs: Path, wsi: str | os.PathLike[str], scalefactors: Mapping[str, float]
) -> np.ndarray | None:
    """diag(s, s, 1) when `wsi` is the bundle's own lowres/hires PNG, else None (full-res)."""
    target = Path(wsi).resolve()
    for image, key in (
        (VisiumFiles.LOWRES_IMAGE, VisiumKeys.LOWRES_SCALEF),
        (VisiumFiles.HIRES_IMAGE, VisiumKeys.HIRES_SCALEF),
    ):
        if (outs / image).resolve() == target:
            scale = scalefactors[key]
            return np.diag([scale, scale, 1.0])
    return None

