"""Vizgen MERSCOPE adapter: cells of the cell-by-gene table, or binned detected transcripts.

Reads a MERSCOPE region folder (or a VPT re-segmentation output folder):

- `units="cells"` (default): `cell_by_gene.csv` (first column `cell`, the EntityID; one column
  per gene, Blank-* barcodes included) joined by EntityID to `cell_metadata.csv` (first column
  the EntityID, unnamed in MERSCOPE output, `EntityID` in VPT output; fov, volume, center_x,
  center_y, min_x, max_x, min_y, max_y, all micrometres). A prefix before those names
  (`<run>_cell_by_gene.csv`) is accepted.
- `units="bins"`: `detected_transcripts.csv` (global_x, global_y in um, global_z, gene; the
  Vizgen post-processing tool's documented format), streamed and summed into `bin_um` squares.
- `images/micron_to_mosaic_pixel_transform.csv` (3x3, space separated): um -> mosaic pixels of
  the DAPI / PolyT mosaics. Recorded in QC and checked (a mirrored or singular transform means a
  damaged bundle); it places the mosaics, not the H&E, so it is not `native_to_wsi`.
- cell boundaries (`cell_boundaries.parquet`, `cell_boundaries/*.hdf5`) are not needed.

Blank-* barcodes are dropped from expression with their per-unit totals kept (`histmol.genes`).
Tables written by R's `read.csv`/`write.csv` (common in shared subsets) mangle names: the
unnamed id column becomes `X`, and "-" becomes "." (`Blank.19`, `HLA.DQA1`); a header holding
`Blank.<n>` columns is recognised as mangled and every "." in its gene names is turned back
into "-" (MERSCOPE gene panels use official symbols, which never contain ".").

Native frame: MERSCOPE global micrometres, x right and y down like the mosaics (the transform's
scale is positive on both axes), 1 um per unit.

Docs: Vizgen post-processing tool, "Output data formats" (detected_transcripts, cell_by_gene,
cell_metadata: https://vizgen.github.io/vizgen-postprocessing/); scverse/spatialdata-io
`readers/merscope.py` (file names, EntityID index, Blank columns, micron_to_mosaic transform).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.errors import BundleError, ConfigError
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
    read_transform,
    require_columns,
)
from platform_adapters._csv_tables import (
    bin_transcripts,
    binned_units,
    header_fields,
    read_dense_counts,
)

PLATFORM = "merscope"
ADAPTER_VERSION = "1"
BBOX_TOLERANCE_UM = 1.0
R_MANGLED_BLANK = re.compile(r"^Blank\.\d+$")
QC = dict[str, float | int | str | bool]
Geometry = tuple[Literal["circle", "square"], float, float | None]


class MerscopeFiles(StrEnum):
    """File name patterns, relative to the region folder."""

    CELL_BY_GENE = "*cell_by_gene.csv"
    CELL_METADATA = "*cell_metadata.csv"
    TRANSCRIPTS = "*detected_transcripts.csv"
    TRANSFORM = "images/micron_to_mosaic_pixel_transform.csv"


class MerscopeKeys(StrEnum):
    """Column names."""

    CELL = "cell"
    ENTITY_ID = "EntityID"
    FOV = "fov"
    VOLUME = "volume"
    CENTER_X = "center_x"
    CENTER_Y = "center_y"
    MIN_X = "min_x"
    MAX_X = "max_x"
    MIN_Y = "min_y"
    MAX_Y = "max_y"
    GLOBAL_X = "global_x"
    GLOBAL_Y = "global_y"
    GENE = "gene"


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
    counts: str | os.PathLike[str] | None = None,
    cell_metadata: str | os.PathLike[str] | None = None,
    transcripts: str | os.PathLike[str] | None = None,
) -> Section:
    """Read a MERSCOPE region folder into a Section in MERSCOPE micrometres.

    Args:
        bundle: the region folder (holding cell_by_gene.csv, cell_metadata.csv, ...).
        wsi: the H&E image (a different image from the mosaics; not opened here).
        section_id: defaults to the slug of the bundle folder's name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of cell_by_gene cells found in cell_metadata.
        native_to_wsi: explicit 3x3 affine, micrometres -> WSI level-0 pixels.
        units: "cells" (cells at their centres) or "bins" (transcripts binned at `bin_um`).
        bin_um: bin side in um for `units="bins"`.
        counts: override the cell_by_gene CSV.
        cell_metadata: override the cell_metadata CSV.
        transcripts: override the detected_transcripts CSV.

    Raises:
        BundleError: a missing, ambiguous or malformed file, a match rate under the threshold,
            cell centres outside their bounding boxes, or a mirrored micron-to-mosaic transform.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    if units not in ("cells", "bins"):
        raise ConfigError(f"units must be 'cells' or 'bins', got {units!r}")
    if not (np.isfinite(float(bin_um)) and float(bin_um) > 0):
        raise ConfigError(f"bin_um must be > 0, got {bin_um}")
    folder = bundle_folder(bundle)
    qc: QC = {"units": units}
    if units == "cells":
        unit_table, panel, files, geometry = _cells(
            folder, counts, cell_metadata, min_match_rate, qc
        )
    else:
        unit_table, panel, files, geometry = _bins(folder, transcripts, float(bin_um), qc)
    transform_file = folder / MerscopeFiles.TRANSFORM
    if transform_file.exists():
        qc.update(_mosaic_transform_qc(transform_file))
        files.append(transform_file)
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
        layout=units,
        metadata=metadata,
        unit_shape=shape,
        unit_size_um=size_um,
        pitch_um=pitch_um,
        default_mode="grid",
        native_to_wsi=explicit,
        native_um_per_unit=1.0,
        qc=qc,
    )


def _find(folder: Path, pattern: str, override: str | os.PathLike[str] | None) -> Path:
    """Find the one file matching `pattern` (or `pattern.gz`); the override wins."""
    if override is not None:
        return explicit_file(override, f"{pattern} file")
    globs = (str(pattern), f"{pattern}.gz")
    found = sorted(p for g in globs for p in folder.glob(g) if p.is_file())
    if len(found) > 1:
        raise BundleError(folder, f"several {pattern} files {[p.name for p in found]}")
    if not found:
        raise BundleError(folder, f"no {pattern}[.gz] found")
    return found[0]


def _mosaic_transform_qc(path: Path) -> QC:
    """Scale and offset of the um -> mosaic px transform; refuse a mirrored or singular one."""
    matrix = read_transform(path)
    det = float(np.linalg.det(matrix[:2, :2]))
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0]) or abs(det) < 1e-12:
        raise BundleError(path, f"not an invertible affine transform: {matrix.tolist()}")
    if det < 0:
        raise BundleError(
            path,
            f"mirrors the frame (determinant {det:.4g}): MERSCOPE maps micrometres to mosaic "
            "pixels by a scale and a shift, so an axis is flipped in this file",
        )
    return {
        "mosaic_px_per_um": float(np.sqrt(det)),
        "mosaic_offset_x_px": float(matrix[0, 2]),
        "mosaic_offset_y_px": float(matrix[1, 2]),
    }


# -- cells -----------------------------------------------------------------------------------


def _cells(
    folder: Path,
    counts: str | os.PathLike[str] | None,
    cell_metadata: str | os.PathLike[str] | None,
    min_match_rate: float,
    qc: QC,
) -> tuple[pd.DataFrame, GenePanel, list[Path], Geometry]:
    """Cells of cell_by_gene at their cell_metadata centres."""
    counts_file = _find(folder, MerscopeFiles.CELL_BY_GENE, counts)
    meta_file = _find(folder, MerscopeFiles.CELL_METADATA, cell_metadata)
    ids, names, matrix = read_dense_counts(counts_file, 1, "cell_by_gene table")
    names, n_unmangled = _unmangle(names)
    cells = _read_cell_metadata(meta_file)
    join = inner_join_ids(
        ids[:, 0],
        cells.index.to_numpy(),
        matrix_file=counts_file,
        positions_file=meta_file,
        min_match_rate=min_match_rate,
        what="cells (EntityID)",
    )
    placed = cells.iloc[join.positions_index]
    units = pd.DataFrame(
        {
            "unit_id": placed.index.to_numpy(object),
            "x_native": placed[MerscopeKeys.CENTER_X].to_numpy(np.float64),
            "y_native": placed[MerscopeKeys.CENTER_Y].to_numpy(np.float64),
        }
    )
    for column in (MerscopeKeys.FOV, MerscopeKeys.VOLUME):
        if column in placed:
            units[column.value] = placed[column].to_numpy()
    panel = build_gene_panel(names, names, sp.csr_matrix(matrix[join.matrix_index]))
    diameter, source = _cell_diameter(placed)
    qc.update(
        n_matrix_cells=join.n_matrix,
        n_matched_cells=join.n_matched,
        cell_match_rate=join.match_rate,
        n_metadata_rows=len(cells),
        n_names_unmangled=n_unmangled,
        unit_size_source=source,
    )
    return units, panel, [counts_file, meta_file], ("circle", diameter, None)


def _unmangle(names: np.ndarray) -> tuple[np.ndarray, int]:
    """Undo R's name mangling ("-" -> ".") when the header shows it (Blank.<n> columns)."""
    if not any(R_MANGLED_BLANK.match(str(n)) for n in names):
        return names, 0
    fixed = np.array([str(n).replace(".", "-") for n in names], dtype=object)
    return fixed, int((fixed != names).sum())


def _read_cell_metadata(path: Path) -> pd.DataFrame:
    """cell_metadata indexed by EntityID (str), with its centres checked against the boxes."""
    keys = MerscopeKeys
    header, _ = header_fields(path)
    try:
        # MERSCOPE leaves the EntityID column unnamed; pandas calls it "Unnamed: 0". Ids run
        # to 38 digits, beyond int64, so they must stay text.
        frame = pd.read_csv(path, dtype={header[0] or "Unnamed: 0": str}, keep_default_na=False)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as CSV: {err}") from err
    require_columns(frame, [keys.CENTER_X.value, keys.CENTER_Y.value], path, "cell metadata")
    frame = frame.set_index(frame.columns[0])
    frame.index = frame.index.astype(str).str.strip()
    numeric = [
        c
        for c in (keys.CENTER_X, keys.CENTER_Y, keys.MIN_X, keys.MAX_X, keys.MIN_Y, keys.MAX_Y)
        if c in frame.columns
    ]
    converted = frame[numeric].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(converted.to_numpy(np.float64)).all():
        raise BundleError(path, f"columns {numeric} hold non-numeric or missing values")
    frame[numeric] = converted
    for centre, low, high in (
        (keys.CENTER_X, keys.MIN_X, keys.MAX_X),
        (keys.CENTER_Y, keys.MIN_Y, keys.MAX_Y),
    ):
        if low in frame.columns and high in frame.columns:
            outside = (frame[centre] < frame[low] - BBOX_TOLERANCE_UM) | (
                frame[centre] > frame[high] + BBOX_TOLERANCE_UM
            )
            if outside.any():
                raise BundleError(
                    path,
                    f"{centre} lies outside [{low}, {high}] for {int(outside.sum())} cells (e.g. "
                    f"{frame.index[outside][:3].tolist()}): x and y swapped or flipped?",
                )
    return frame


def _cell_diameter(cells: pd.DataFrame) -> tuple[float, str]:
    """Median mean side of the cells' bounding boxes, else a nominal 10 um."""
    keys = MerscopeKeys
    if {keys.MIN_X, keys.MAX_X, keys.MIN_Y, keys.MAX_Y} <= set(cells.columns):
        width = cells[keys.MAX_X] - cells[keys.MIN_X]
        height = cells[keys.MAX_Y] - cells[keys.MIN_Y]
        median = float(np.median((width + height) / 2.0))
        if median > 0:
            return median, "median_bounding_box"
    return 10.0, "nominal"


# -- bins ------------------------------------------------------------------------------------


def _bins(
    folder: Path,
    transcripts: str | os.PathLike[str] | None,
    bin_um: float,
    qc: QC,
) -> tuple[pd.DataFrame, GenePanel, list[Path], Geometry]:
    """Every detected transcript summed into `bin_um` squares."""
    keys = MerscopeKeys
    path = _find(folder, MerscopeFiles.TRANSCRIPTS, transcripts)
    header, _ = header_fields(path)
    required = [keys.GLOBAL_X.value, keys.GLOBAL_Y.value, keys.GENE.value]
    require_columns(pd.DataFrame(columns=header), required, path, "transcripts table")
    binned = bin_transcripts(path, x=keys.GLOBAL_X, y=keys.GLOBAL_Y, gene=keys.GENE, bin_um=bin_um)
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
