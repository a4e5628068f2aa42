"""NanoString/Bruker CosMx SMI adapter: flat-file exports, legacy and AtoMx SIP.

Reads, from the bundle folder (`<run>` is any prefix; `.csv.gz` accepted for each):

- `units="cells"` (default): `<run>_exprMat_file.csv` (fov, cell_ID, one column per target,
  NegPrb*/Negative* negative probes and, from AtoMx 1.3.2, SystemControl* codes) joined on
  (fov, cell_ID) to `<run>_metadata_file.csv` (CenterX/Y_global_px, CenterX/Y_local_px, Area).
  Rows with cell_ID 0 are the transcripts outside every cell (legacy exports write one per FOV):
  they are background, not cells, dropped and reported in QC.
- `units="bins"`: `<run>_tx_file.csv` (x_global_px, y_global_px, x_local_px, target), streamed
  in blocks and summed into `bin_um` squares (`histmol.binning.BinAccumulator`).
- `<run>_fov_positions_file.csv`, optional: legacy `fov, x_global_px, y_global_px`; AtoMx >=
  1.3.2 `FOV, x_global_px, y_global_px, x_global_mm, y_global_mm`. It names the export layout,
  places local coordinates when a metadata file has no global ones, and checks the pixel size.
- `<run>-polygons.csv`, CellComposite/, CellLabels/ are not needed and not read.

Frames (details in `_cosmx_frames`): the native frame is micrometres with the global pixel
frame's y axis (Cartesian, up) turned to image convention: x_native = x_global_px * px_um,
y_native = -y_global_px * px_um, px_um 0.12028 (commercial) or 0.18 (the "Dash" prototype of
the 2022 NSCLC release), detected from the files and overridable with `px_size_um`. Global and
local coordinates must be a per-FOV translation of each other (the sign of y differs between the
legacy and AtoMx >= 1.3.2 layouts); a file where they are not is refused.

Docs: NanoString CosMx-Analysis-Scratch-Space "flat-file-exports/flat-files-compare" (column
tables for legacy and AtoMx 1.3.2); scverse/spatialdata-io `readers/cosmx/` (file discovery,
background rows, mm -> px with 0.120280945 um/px).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.errors import BundleError, ConfigError
from histmol.registration import median_neighbour_distance
from histmol.section import Section
from platform_adapters._common import (
    GenePanel,
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    inner_join_ids,
    panel_section,
    require_columns,
)
from platform_adapters._cosmx_frames import (
    QC,
    CosmxKeys,
    cell_centres,
    layout_of,
    pixel_size,
    read_fov_positions,
)
from platform_adapters._csv_tables import (
    bin_transcripts,
    binned_units,
    header_fields,
    read_dense_counts,
)

PLATFORM = "cosmx"
ADAPTER_VERSION = "1"


class CosmxFiles(StrEnum):
    """Flat-file name patterns (each also read gzipped)."""

    EXPR_MAT = "*_exprMat_file.csv"
    METADATA = "*_metadata_file.csv"
    FOV_POSITIONS = "*_fov_positions_file.csv"
    TX = "*_tx_file.csv"


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    units: Literal["cells", "bins"] = "cells",
    bin_um: float = 8.0,
    px_size_um: float | None = None,
    counts: str | os.PathLike[str] | None = None,
    cell_metadata: str | os.PathLike[str] | None = None,
    fov_positions: str | os.PathLike[str] | None = None,
    transcripts: str | os.PathLike[str] | None = None,
) -> Section:
    """Read CosMx flat files into a Section in micrometres (y turned to image convention).

    Args:
        bundle: the folder holding the flat files.
        wsi: the H&E image (usually scanned after the run; not opened here).
        section_id: defaults to the slug of the bundle folder's name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of expression cells found in the metadata file.
        native_to_wsi: explicit 3x3 affine, micrometres -> WSI level-0 pixels.
        units: "cells" (segmented cells at their centroids) or "bins" (transcripts binned).
        bin_um: bin side in um for `units="bins"`.
        px_size_um: micrometres per CosMx pixel (default: detected, see the module docs).
        counts: override the `*_exprMat_file.csv`.
        cell_metadata: override the `*_metadata_file.csv`.
        fov_positions: override the `*_fov_positions_file.csv`.
        transcripts: override the `*_tx_file.csv`.

    Raises:
        BundleError: a missing, ambiguous or malformed file, a match rate under the threshold,
            or global and local coordinates that are not a per-FOV translation.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    if units not in ("cells", "bins"):
        raise ConfigError(f"units must be 'cells' or 'bins', got {units!r}")
    if not (np.isfinite(float(bin_um)) and float(bin_um) > 0):
        raise ConfigError(f"bin_um must be > 0, got {bin_um}")
    if px_size_um is not None and not 0.01 <= float(px_size_um) <= 10:
        raise ConfigError(f"px_size_um must be in 0.01..10 um, got {px_size_um}")
    folder = bundle_folder(bundle)
    fov_file = _find(folder, CosmxFiles.FOV_POSITIONS, fov_positions)
    fovs = read_fov_positions(fov_file) if fov_file is not None else None
    qc: QC = {"units": units, "layout": layout_of(fovs)}
    if units == "cells":
        unit_table, panel, files, geometry = _cells(
            folder, counts, cell_metadata, fovs, min_match_rate, px_size_um, qc
        )
    else:
        unit_table, panel, files, geometry = _bins(
            folder, transcripts, fovs, float(bin_um), px_size_um, qc
        )
    if fov_file is not None:
        files.append(fov_file)
        qc["n_fov_positions"] = len(fovs) if fovs is not None else 0
    qc["n_control_probes"] = panel.n_controls
    shape, size_um, pitch_um = geometry
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=unit_table,
        panel=panel,
        files=files,
        layout=str(qc["layout"]),
        metadata=metadata,
        unit_shape=shape,
        unit_size_um=size_um,
        pitch_um=pitch_um,
        default_mode="grid",
        native_to_wsi=explicit,
        native_um_per_unit=1.0,
        qc=qc,
    )


Geometry = tuple[Literal["circle", "square"], float, float | None]


# -- files -----------------------------------------------------------------------------------


def _find(folder: Path, pattern: str, override: str | os.PathLike[str] | None) -> Path | None:
    """Find the one file matching `pattern` (or `pattern.gz`); the override wins; else None."""
    if override is not None:
        return explicit_file(override, f"{pattern} file")
    found = sorted(
        p for g in (str(pattern), f"{pattern}.gz") for p in folder.glob(g) if p.is_file()
    )
    if len(found) > 1:
        raise BundleError(
            folder, f"several {pattern} files {[p.name for p in found]}; pass the file explicitly"
        )
    return found[0] if found else None


def _require(
    folder: Path, pattern: str, override: str | os.PathLike[str] | None, hint: str = ""
) -> Path:
    path = _find(folder, pattern, override)
    if path is None:
        raise BundleError(folder, f"no {pattern}[.gz] found{hint}")
    return path


# -- cells -----------------------------------------------------------------------------------


def _cells(
    folder: Path,
    counts: str | os.PathLike[str] | None,
    cell_metadata: str | os.PathLike[str] | None,
    fovs: pd.DataFrame | None,
    min_match_rate: float,
    px_size_um: float | None,
    qc: QC,
) -> tuple[pd.DataFrame, GenePanel, list[Path], Geometry]:
    """Cells of the expression matrix at their metadata centroids."""
    hint = "; a transcripts-only bundle is read with units='bins'"
    expr_file = _require(folder, CosmxFiles.EXPR_MAT, counts, hint)
    meta_file = _require(folder, CosmxFiles.METADATA, cell_metadata, hint)
    fov, cell, targets, matrix = _read_expression(expr_file)
    background = cell == 0
    qc.update(
        n_expression_rows=len(cell),
        n_background_rows=int(background.sum()),
        background_counts=int(matrix[np.flatnonzero(background)].sum()),
    )
    keep = np.flatnonzero(~background)
    fov, cell, matrix = fov[keep], cell[keep], sp.csr_matrix(matrix[keep])
    cells = _read_metadata(meta_file)
    join = inner_join_ids(
        _keys(fov, cell),
        _keys(cells[CosmxKeys.FOV], cells[CosmxKeys.CELL_ID]),
        matrix_file=expr_file,
        positions_file=meta_file,
        min_match_rate=min_match_rate,
        what="cells (fov, cell_ID)",
    )
    placed = cells.iloc[join.positions_index].reset_index(drop=True)
    local_max = (
        float(placed[CosmxKeys.CENTER_X_LOCAL].max())
        if CosmxKeys.CENTER_X_LOCAL in placed
        else None
    )
    px = pixel_size(px_size_um, fovs, local_max, qc)
    x_px, y_px = cell_centres(placed, fovs, meta_file, qc)
    units = pd.DataFrame(
        {
            "unit_id": _keys(placed[CosmxKeys.FOV], placed[CosmxKeys.CELL_ID]),
            "x_native": x_px * px,
            "y_native": -y_px * px,
            "fov": placed[CosmxKeys.FOV].to_numpy(np.int64),
            "cell_ID": placed[CosmxKeys.CELL_ID].to_numpy(np.int64),
        }
    )
    if CosmxKeys.AREA in placed:
        units["area_um2"] = placed[CosmxKeys.AREA].to_numpy(np.float64) * px * px
    panel = build_gene_panel(targets, targets, sp.csr_matrix(matrix[join.matrix_index]))
    diameter, source = _cell_diameter(units)
    qc.update(
        n_metadata_rows=len(cells),
        n_matched_cells=join.n_matched,
        cell_match_rate=join.match_rate,
        n_fovs=int(units["fov"].nunique()),
        unit_size_source=source,
    )
    return units, panel, [expr_file, meta_file], ("circle", diameter, None)


def _keys(fov: np.ndarray | pd.Series, cell: np.ndarray | pd.Series) -> np.ndarray:
    """`<fov>_<cell_ID>` cell keys (cell_ID is only unique within a FOV)."""
    fov_s = pd.Series(np.asarray(fov, dtype=np.int64)).astype(str)
    cell_s = pd.Series(np.asarray(cell, dtype=np.int64)).astype(str)
    return (fov_s + "_" + cell_s).to_numpy(object)


def _read_expression(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
    """(fov, cell_ID, target names, cells x targets counts) of the expression matrix."""
    header, _ = header_fields(path)
    if header[:2] != [CosmxKeys.FOV, CosmxKeys.CELL_ID]:
        raise BundleError(
            path,
            f"expression matrix must start with columns ['fov', 'cell_ID']; found {header[:4]}",
        )
    ids, targets, matrix = read_dense_counts(path, 2, "expression matrix")
    numbers = pd.DataFrame(ids).apply(pd.to_numeric, errors="coerce")
    if numbers.isna().to_numpy().any():
        raise BundleError(path, "fov / cell_ID hold non-integer values")
    values = numbers.to_numpy(np.int64)
    return values[:, 0], values[:, 1], targets, matrix


def _read_metadata(path: Path) -> pd.DataFrame:
    """Read the placement columns of the cell metadata; cell_ID 0 (background) rows dropped."""
    keys = CosmxKeys
    wanted = {
        keys.FOV,
        keys.CELL_ID,
        keys.AREA,
        keys.CENTER_X_LOCAL,
        keys.CENTER_Y_LOCAL,
        keys.CENTER_X_GLOBAL,
        keys.CENTER_Y_GLOBAL,
    }
    try:
        frame = pd.read_csv(path, usecols=lambda c: c in wanted)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as CSV: {err}") from err
    require_columns(frame, [keys.FOV.value, keys.CELL_ID.value], path, "cell metadata")
    has_global = {keys.CENTER_X_GLOBAL, keys.CENTER_Y_GLOBAL} <= set(frame.columns)
    has_local = {keys.CENTER_X_LOCAL, keys.CENTER_Y_LOCAL} <= set(frame.columns)
    if not (has_global or has_local):
        require_columns(
            frame, [keys.CENTER_X_GLOBAL.value, keys.CENTER_Y_GLOBAL.value], path, "cell metadata"
        )
    converted = frame.apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(converted.to_numpy(np.float64)).all():
        raise BundleError(
            path, "cell metadata placement columns hold non-numeric or missing values"
        )
    return converted[converted[keys.CELL_ID] != 0].reset_index(drop=True)


def _cell_diameter(units: pd.DataFrame) -> tuple[float, str]:
    """Diameter of the disc with the median cell area, else the median nearest-cell distance."""
    if "area_um2" in units and np.nanmedian(units["area_um2"]) > 0:
        return float(2.0 * np.sqrt(np.nanmedian(units["area_um2"]) / np.pi)), "median_cell_area"
    distance = median_neighbour_distance(units["x_native"].to_numpy(), units["y_native"].to_numpy())
    return float(distance or 10.0), "median_neighbour_distance"


# -- bins ------------------------------------------------------------------------------------


def _bins(
    folder: Path,
    transcripts: str | os.PathLike[str] | None,
    fovs: pd.DataFrame | None,
    bin_um: float,
    px_size_um: float | None,
    qc: QC,
) -> tuple[pd.DataFrame, GenePanel, list[Path], Geometry]:
    """Every transcript of the tx file (in cells or not) summed into `bin_um` squares."""
    path = _require(folder, CosmxFiles.TX, transcripts)
    keys = CosmxKeys
    header, _ = header_fields(path)
    require_columns(
        pd.DataFrame(columns=header),
        [keys.X_GLOBAL_PX.value, keys.Y_GLOBAL_PX.value, keys.TARGET.value],
        path,
        "transcripts table",
    )
    local_max = None
    if keys.X_LOCAL_PX in header:
        try:
            sample = pd.read_csv(path, usecols=[keys.X_LOCAL_PX.value], nrows=200_000)
        except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
            raise BundleError(path, f"cannot read as CSV: {err}") from err
        local_max = float(pd.to_numeric(sample[keys.X_LOCAL_PX], errors="coerce").max())
    px = pixel_size(px_size_um, fovs, local_max, qc)
    binned = bin_transcripts(
        path,
        x=keys.X_GLOBAL_PX,
        y=keys.Y_GLOBAL_PX,
        gene=keys.TARGET,
        bin_um=bin_um,
        scale_xy=(px, -px),
    )
    unit_table, panel, n_controls_only = binned_units(binned, bin_um)
    qc.update(
        bin_um=bin_um,
        transcripts_source=path.name,
        n_transcripts=binned.n_points,
        n_targets=len(binned.names),
        n_bins=len(unit_table),
        n_bins_controls_only=n_controls_only,
    )
    return unit_table, panel, [path], ("square", bin_um, bin_um)
