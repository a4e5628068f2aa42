"""Legacy Spatial Transcriptomics (Stahl et al. 2016; ST "1k"/"2k" arrays) adapter.

Reads, from one bundle folder:

- the count matrix: a tab-separated `*.tsv[.gz]` from the ST Pipeline, spots as rows or as
  columns, spot ids `XxY` in array coordinates (`10x12`; adjusted coordinates such as
  `10.02x12.1` when the matrix was rewritten with the spot detector's new_x/new_y), genes as
  Ensembl ids or symbols. Orientation is detected from where the `XxY` ids are.
- spot pixel positions, one of:
  - an ST Spot Detector selection file (`*selection*.tsv`; columns `x y new_x new_y pixel_x
    pixel_y [selected]`, header row, older exports headerless; SpatialTranscriptomicsResearch/
    st_spot_detector), or
  - an STUtility alignment table (`alignment_table*.tsv`): the same columns and semantics
    (jbergenstrahle/STUtility `InputFromTable` reads both with `parse.spot.file`).
  `selected == 1` marks spots under the tissue; STUtility keeps only those (`tissue_only=True`,
  the default here); stlearn's `ReadOldST`/`parsing` keeps every spot with a row
  (`tissue_only=False`).
- without a positions file the native frame is the array grid (x, y in array units) and a
  transform is needed: `native_to_wsi=`, the spot detector's exported array-to-pixel affine
  (`transform=`, 9 numbers in column-major order), or `cropped_image_size=(width, height)` for an
  H&E image cropped to the 1k array's outer spots: pixel = ((x - 1) * width / 32,
  (y - 1) * height / 34), the convention of jfnavarro/st_analysis
  `scripts/convert_spot_coordinates.py` (33 x 35 spot array; HEST's `_ST_spot_to_pixel` uses the
  same x step and height / 34.06 for y).

Join: count spot ids are matched to positions by array coordinates as the tools do
(STUtility pastes `x`, `y` into `XxY`; stlearn keys on integer (x, y)); fractional ids are
adjusted coordinates and are matched to (new_x, new_y) at the spot detector's 2 decimals
(stlearn rounds new_x/new_y to 2 decimals).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.errors import BundleError, ConfigError
from histmol.section import ArrayLattice, Section
from platform_adapters._common import (
    EXAMPLES,
    as_int32_counts,
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    first_line,
    inner_join_ids,
    panel_section,
    read_transform,
    require_columns,
)

PLATFORM = "st"
ADAPTER_VERSION = "1"

SPOT_DIAMETER_UM = 100.0
SPOT_PITCH_UM = 200.0
ARRAY_1K_COLUMNS = 33  # x in 1..33
ARRAY_1K_ROWS = 35  # y in 1..35

SPOT_ID = re.compile(r"^\s*(-?\d+(?:\.\d+)?)x(-?\d+(?:\.\d+)?)\s*$")


class STFiles(StrEnum):
    """File name patterns (glob) in a legacy ST bundle."""

    SELECTION = "*selection*.tsv"  # ST Spot Detector export, e.g. spot_data-selection-<img>.tsv
    SELECTION_GZ = "*selection*.tsv.gz"
    ALIGNMENT_TABLE = "alignment_table*.tsv"  # STUtility example data
    ALIGNMENT_TABLE_GZ = "alignment_table*.tsv.gz"
    COUNTS = "*.tsv"  # ST Pipeline count matrix (any other .tsv)
    COUNTS_GZ = "*.tsv.gz"


class STKeys(StrEnum):
    """Columns of the spot detector selection / STUtility alignment table."""

    X = "x"  # array column of the spot (integer)
    Y = "y"  # array row
    NEW_X = "new_x"  # adjusted array coordinates (2 decimals)
    NEW_Y = "new_y"
    PIXEL_X = "pixel_x"  # image column of the spot centre
    PIXEL_Y = "pixel_y"  # image row
    SELECTED = "selected"  # 1 = under tissue; absent from the oldest exports


# Headerless exports: STUtility `InputFromTable` names 6 or 7 columns in this order.
POSITION_COLUMNS = (STKeys.X, STKeys.Y, STKeys.NEW_X, STKeys.NEW_Y, STKeys.PIXEL_X, STKeys.PIXEL_Y)
REQUIRED_COLUMNS = (STKeys.X, STKeys.Y, STKeys.PIXEL_X, STKeys.PIXEL_Y)
POSITION_PATTERNS = (
    STFiles.SELECTION,
    STFiles.SELECTION_GZ,
    STFiles.ALIGNMENT_TABLE,
    STFiles.ALIGNMENT_TABLE_GZ,
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
    transform: str | os.PathLike[str] | None = None,
    tissue_only: bool = True,
    cropped_image_size: tuple[int, int] | None = None,
) -> Section:
    """Read a legacy ST bundle into a Section.

    Args:
        bundle: folder holding the count matrix and, usually, a positions file and the H&E.
        wsi: the H&E image the pixel positions refer to (not opened here).
        section_id: defaults to the slug of the bundle folder name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of count spots that must have a positions row.
        native_to_wsi: explicit 3x3 affine from the native frame (positions-file pixels, or
            array coordinates without one) to WSI level-0 pixels; wins over everything else.
        counts: the count matrix, overriding autodetection.
        positions: the selection / alignment table, overriding autodetection.
        transform: the spot detector's array-to-pixel affine file (used without positions).
        tissue_only: keep only spots whose `selected` is 1 (when that column exists).
        cropped_image_size: (width, height) of an H&E cropped to a 1k array's outer spots, for
            the documented naive mapping when there is no positions file.

    Raises:
        BundleError: a missing, ambiguous or malformed file, spot ids that are not `XxY`, a
            match rate under the threshold, or no way to place spots on the image.
    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    folder = bundle_folder(bundle)
    positions_file = (
        explicit_file(positions, "positions file") if positions else _find_positions(folder)
    )
    counts_file = (
        explicit_file(counts, "count matrix") if counts else _find_counts(folder, positions_file)
    )
    matrix, spot_ids = _read_counts(counts_file)
    xy = _parse_spot_ids(spot_ids, counts_file)
    files = [counts_file]
    qc: dict[str, float | int | str | bool] = {"n_count_spots": len(spot_ids)}

    if positions_file is not None:
        rows, units, layout = _place_with_positions(
            positions_file, counts_file, spot_ids, xy, min_match_rate, tissue_only, qc
        )
        files.append(positions_file)
        transform_matrix = explicit
    else:
        rows = np.arange(len(spot_ids))
        units = pd.DataFrame(
            {
                "unit_id": spot_ids,
                "x_native": xy[:, 0],
                "y_native": xy[:, 1],
                "array_x": xy[:, 0],
                "array_y": xy[:, 1],
            }
        )
        transform_matrix, layout = _naive_transform(
            folder, counts_file, xy, explicit, transform, cropped_image_size
        )
        if transform is not None and explicit is None:
            files.append(Path(transform))
        qc["n_matched_spots"] = len(spot_ids)

    array_layout = _array_layout(xy)
    qc["array_layout"] = array_layout
    panel = build_gene_panel(matrix.gene_ids, matrix.gene_ids, matrix.counts[rows])
    qc["n_control_probes"] = panel.n_controls
    qc["tissue_only"] = tissue_only
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=units,
        panel=panel,
        files=files,
        layout=layout,
        metadata=metadata,
        unit_shape="circle",
        unit_size_um=SPOT_DIAMETER_UM,
        pitch_um=SPOT_PITCH_UM if array_layout == "1k" else None,
        # 1k: array x and y step by the 200 um pitch; the 2k arrays' step is undocumented
        array_lattice=(
            ArrayLattice("array_x", "array_y", SPOT_PITCH_UM, SPOT_PITCH_UM)
            if array_layout == "1k"
            else None
        ),
        default_mode="spot",
        native_to_wsi=transform_matrix,
        native_um_per_unit=None,
        qc=qc,
    )


def _array_layout(xy: np.ndarray) -> str:
    """'1k' for the 33 x 35 square array (200 um pitch), else '2k-staggered' or 'unknown'.

    The later ~2,000-spot arrays index spots on a checkerboard (x + y even, x up to ~66); their
    nearest neighbours are diagonal and no public document we found states that distance, so
    no pitch is claimed for them: the image's mpp must then come from the file or --mpp.
    """
    ids = np.round(xy).astype(np.int64)
    if len(ids) and (ids[:, 0] <= ARRAY_1K_COLUMNS).all() and (ids[:, 1] <= ARRAY_1K_ROWS).all():
        return "1k"
    if len(ids) and ((ids[:, 0] + ids[:, 1]) % 2 == 0).all():
        return "2k-staggered"
    return "unknown"


def _place_with_positions(
    positions_file: Path,
    counts_file: Path,
    spot_ids: np.ndarray,
    xy: np.ndarray,
    min_match_rate: float,
    tissue_only: bool,
    qc: dict[str, float | int | str | bool],
) -> tuple[np.ndarray, pd.DataFrame, str]:
    """Join count spots onto the positions table: matrix rows kept, units table, layout name."""
    table = _read_positions(positions_file)
    keys, table_keys, key_kind = _join_keys(xy, table)
    join = inner_join_ids(
        keys,
        table_keys,
        matrix_file=counts_file,
        positions_file=positions_file,
        min_match_rate=min_match_rate,
        what="spots",
    )
    rows = join.matrix_index
    placed = table.iloc[join.positions_index].reset_index(drop=True)
    qc.update(
        n_matched_spots=join.n_matched,
        spot_match_rate=join.match_rate,
        n_position_rows=len(table),
        join_key=key_kind,
    )
    has_selected = STKeys.SELECTED in placed.columns
    if has_selected:
        selected = (placed[STKeys.SELECTED] == 1).to_numpy()
        qc["n_matched_selected"] = int(selected.sum())
        if tissue_only:
            rows, placed = rows[selected], placed.loc[selected].reset_index(drop=True)
            if len(rows) == 0:
                raise BundleError(positions_file, "no matched spot is selected (under tissue)")
    units = pd.DataFrame(
        {
            "unit_id": spot_ids[rows],
            "x_native": placed[STKeys.PIXEL_X].to_numpy(np.float64),
            "y_native": placed[STKeys.PIXEL_Y].to_numpy(np.float64),
            "array_x": placed[STKeys.X].to_numpy(np.int32),
            "array_y": placed[STKeys.Y].to_numpy(np.int32),
        }
    )
    for column in (STKeys.NEW_X, STKeys.NEW_Y):
        if column in placed.columns:
            units[column.value] = placed[column].to_numpy(np.float64)
    if has_selected:
        units["in_tissue"] = placed[STKeys.SELECTED].to_numpy(np.int8)
    is_alignment = positions_file.name.startswith("alignment_table")
    return rows, units, "stutility_alignment_table" if is_alignment else "spot_detector_selection"


@dataclass(frozen=True)
class _Counts:
    """Spots x genes counts with the gene labels as given."""

    counts: sp.csr_matrix
    gene_ids: np.ndarray


def _glob(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    found = {p for pattern in patterns for p in folder.glob(str(pattern)) if p.is_file()}
    return sorted(found)


def _find_positions(folder: Path) -> Path | None:
    candidates = _glob(folder, POSITION_PATTERNS)
    if len(candidates) > 1:
        raise BundleError(
            folder,
            f"ambiguous spot positions: several candidates {[p.name for p in candidates]}; "
            "pass positions= to choose one",
        )
    return candidates[0] if candidates else None


def _find_counts(folder: Path, positions_file: Path | None) -> Path:
    excluded = set(_glob(folder, POSITION_PATTERNS))
    if positions_file is not None:
        excluded.add(positions_file)
    found = _glob(folder, (STFiles.COUNTS, STFiles.COUNTS_GZ))
    candidates = [p for p in found if p not in excluded]
    if not candidates:
        raise BundleError(
            folder,
            f"no count matrix found; looked for {STFiles.COUNTS} and {STFiles.COUNTS_GZ} other "
            f"than positions files ({', '.join(POSITION_PATTERNS)})",
        )
    if len(candidates) > 1:
        raise BundleError(
            folder,
            f"ambiguous count matrix: several candidates {[p.name for p in candidates]}; "
            "pass counts= to choose one",
        )
    return candidates[0]


def _is_spot_id(value: str) -> bool:
    return bool(SPOT_ID.match(value))


def _read_counts(path: Path) -> tuple[_Counts, np.ndarray]:
    """Counts as spots x genes and the spot ids, whichever way round the file has them."""
    header = first_line(path).split("\t")
    if len(header) < 2:
        raise BundleError(path, "not a tab-separated count matrix (one column in the header)")
    try:
        body = pd.read_csv(
            path, sep="\t", header=None, skiprows=1, index_col=0, dtype={0: str}, low_memory=False
        )
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as a tab-separated count matrix: {err}") from err
    # The header may or may not hold a corner cell above the row labels (R's write.table omits it).
    labels = header[1:] if len(header) == body.shape[1] + 1 else header
    if len(labels) != body.shape[1]:
        raise BundleError(
            path, f"header has {len(header)} fields but rows have {body.shape[1] + 1}"
        )
    labels = [label.strip().strip('"') for label in labels]
    row_ids = body.index.astype(str).str.strip().str.strip('"').to_numpy(object)
    columns_are_spots = sum(map(_is_spot_id, labels)) > len(labels) / 2
    rows_are_spots = sum(map(_is_spot_id, row_ids)) > len(row_ids) / 2
    if not (columns_are_spots or rows_are_spots):
        raise BundleError(
            path,
            "no XxY spot ids (e.g. '10x12') found in the header or the first column; row labels "
            f"(first column) {list(row_ids[:EXAMPLES])}, column labels (header) "
            f"{labels[:EXAMPLES]}",
        )
    if not all(pd.api.types.is_numeric_dtype(t) for t in body.dtypes):
        body = body.apply(pd.to_numeric, errors="coerce")
    values = body.to_numpy()
    if np.isnan(values.astype(np.float64, copy=False)).any():
        raise BundleError(path, "count matrix holds non-numeric or missing values")
    matrix = sp.csr_matrix(values)
    if rows_are_spots:
        spot_ids, genes = row_ids, np.asarray(labels, dtype=object)
    else:
        spot_ids, genes = np.asarray(labels, dtype=object), row_ids
        matrix = sp.csr_matrix(matrix.T)
    bad = [s for s in spot_ids if not _is_spot_id(s)][:EXAMPLES]
    if bad:
        raise BundleError(
            path, f"spot ids must be XxY array coordinates (e.g. '10x12'); found {bad}"
        )
    if pd.Index(spot_ids).has_duplicates:
        dupes = pd.Index(spot_ids)[pd.Index(spot_ids).duplicated()][:EXAMPLES].tolist()
        raise BundleError(path, f"duplicate spot ids {dupes}")
    counts = as_int32_counts(matrix, path, row_names=np.asarray(spot_ids, dtype=object),
                             col_names=np.asarray(genes, dtype=object))
    return _Counts(counts, genes), spot_ids


def _parse_spot_ids(spot_ids: np.ndarray, path: Path) -> np.ndarray:
    """(n, 2) float array of the (x, y) in each `XxY` id."""
    parts = pd.Series(spot_ids).str.extract(SPOT_ID)
    xy = parts.astype(np.float64).to_numpy()
    if np.isnan(xy).any():
        raise BundleError(path, "spot ids must be XxY array coordinates")
    return xy


def _read_positions(path: Path) -> pd.DataFrame:
    first = first_line(path).split("\t")
    has_header = first[0].strip().strip('"').lower() == STKeys.X.value  # as stlearn checks
    try:
        frame = pd.read_csv(path, sep="\t", header=0 if has_header else None)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as a tab-separated positions table: {err}") from err
    if has_header:
        frame.columns = [str(c).strip() for c in frame.columns]
        require_columns(frame, [c.value for c in REQUIRED_COLUMNS], path, "positions table")
    else:
        names = [c.value for c in POSITION_COLUMNS]
        if frame.shape[1] == 7:
            names.append(STKeys.SELECTED.value)
        elif frame.shape[1] != 6:
            raise BundleError(
                path,
                f"headerless positions table has {frame.shape[1]} columns; expected 6 or 7: "
                f"{names + [STKeys.SELECTED.value]}",
            )
        frame.columns = names
    numeric = [c for c in frame.columns if c in {k.value for k in STKeys}]
    converted = frame[numeric].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in numeric if not np.isfinite(converted[c].to_numpy(np.float64)).all()]
    if bad:
        raise BundleError(path, f"columns {bad} hold non-numeric or missing values")
    frame[numeric] = converted
    xy = frame[[STKeys.X, STKeys.Y]].to_numpy(np.float64)
    if not np.array_equal(xy, np.round(xy)):
        raise BundleError(path, "columns x, y must be integer array coordinates")
    return frame


def _join_keys(xy: np.ndarray, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """String keys for count spots and positions rows, and which coordinates they use."""
    if np.array_equal(xy, np.round(xy)):
        kind, spot_xy = "array_xy", xy.astype(np.int64)
        table_xy = table[[STKeys.X, STKeys.Y]].to_numpy(np.float64).astype(np.int64)
        return _keys(spot_xy, "{:d}"), _keys(table_xy, "{:d}"), kind
    if STKeys.NEW_X in table.columns and STKeys.NEW_Y in table.columns:
        table_xy = np.round(table[[STKeys.NEW_X, STKeys.NEW_Y]].to_numpy(np.float64), 2)
        return _keys(np.round(xy, 2), "{:.2f}"), _keys(table_xy, "{:.2f}"), "adjusted_new_xy"
    # Adjusted ids but no adjusted columns to match them: nearest array position.
    table_xy = table[[STKeys.X, STKeys.Y]].to_numpy(np.float64).astype(np.int64)
    return _keys(np.rint(xy).astype(np.int64), "{:d}"), _keys(table_xy, "{:d}"), "rounded_array_xy"


def _keys(xy: np.ndarray, fmt: str) -> np.ndarray:
    template = f"{fmt}x{fmt}"
    return np.array([template.format(x, y) for x, y in xy.tolist()], dtype=object)


def _naive_transform(
    folder: Path,
    counts_file: Path,
    xy: np.ndarray,
    explicit: np.ndarray | None,
    transform: str | os.PathLike[str] | None,
    cropped_image_size: tuple[int, int] | None,
) -> tuple[np.ndarray, str]:
    """The array-to-image transform when there is no positions file, and the layout name."""
    if explicit is not None:
        return explicit, "naive_grid_explicit_transform"
    if transform is not None:
        path = explicit_file(transform, "spot detector transform")
        return read_transform(path, order="column"), "naive_grid_spot_detector_transform"
    if cropped_image_size is not None:
        width, height = _image_size(cropped_image_size)
        outside = (xy[:, 0] < 1) | (xy[:, 0] > ARRAY_1K_COLUMNS) | (xy[:, 1] < 1) | (
            xy[:, 1] > ARRAY_1K_ROWS
        )
        if outside.any():
            raise BundleError(
                counts_file,
                f"{int(outside.sum())} spot ids lie outside the 1k array's 33 x 35 grid, so the "
                "cropped-image convention does not apply; give native_to_wsi or a positions file",
            )
        sx, sy = width / (ARRAY_1K_COLUMNS - 1), height / (ARRAY_1K_ROWS - 1)
        matrix = np.array([[sx, 0.0, -sx], [0.0, sy, -sy], [0.0, 0.0, 1.0]])
        return matrix, "naive_grid_cropped_1k"
    raise BundleError(
        folder,
        "no spot detector selection file or STUtility alignment table found (looked for "
        f"{', '.join(POSITION_PATTERNS)}); without one the spots are only known in array "
        "coordinates, so an explicit transform is needed: pass native_to_wsi=, transform= (the "
        "spot detector's array-to-pixel matrix) or cropped_image_size=(width, height) for an "
        "image cropped to the 1k array",
    )


def _image_size(size: tuple[int, int]) -> tuple[float, float]:
    try:
        width, height = (float(v) for v in size)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cropped_image_size must be (width, height), got {size!r}") from err
    if not (width > 0 and height > 0):
        raise ConfigError(f"cropped_image_size must be positive, got {size!r}")
    return width, height
