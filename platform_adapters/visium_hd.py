"""10x Genomics Visium HD (Space Ranger >= 3.0) adapter: square bins of any even size, or cells.

Reads a Space Ranger `outs/` folder (or the folder holding it). Bins (`units="bins"`), from
`binned_outputs/square_{bin:03d}um/` (Space Ranger writes 002, 008 and 016):

- `filtered_feature_bc_matrix.h5`: 10x HDF5, CSC over barcodes `s_002um_{row:05d}_{col:05d}-1`;
  read in barcode chunks (`_tenx.TenxH5Chunks`), never whole. The MEX folder beside it is not
  read: every Space Ranger HD release writes the h5.
- `spatial/tissue_positions.parquet`: barcode, in_tissue, array_row, array_col,
  pxl_row_in_fullres, pxl_col_in_fullres, every bin of the capture area. Columns are read by
  name: a missing or renamed column is an error listing found and expected columns; columns in
  another order are accepted and reported (`qc["positions_column_order"] == "reordered"`).
- `spatial/scalefactors_json.json`: bin_size_um (must match the folder name),
  microns_per_pixel, spot_diameter_fullres (= bin_size_um / microns_per_pixel, checked).

A requested `bin_um` with its own folder is read directly; otherwise the finest folder whose size
divides it is summed into `bin_um` squares (array row // factor, column // factor) while
streaming, and each new bin's centre is the image of its array-index centre through the
array -> full-resolution px affine fitted by least squares over the source bins (residuals in
qc). Checks: barcodes name their array_row/array_col; indices are non-negative integers and no
bin is listed twice; the fitted bin pitch agrees with microns_per_pixel and bin_size_um within
2 %; no bin sits more than half a bin off the fitted affine; whether the listed bins fill their
grid extent is reported (`positions_grid_complete`: Space Ranger lists the whole capture area,
subsets such as the VisiumIO fixture do not).

Cells (`units="cells"`), Space Ranger 4 `segmented_outputs/`: `filtered_feature_cell_matrix.h5`
(barcodes `cellid_{cell_id:09d}-1`), `cell_segmentations.geojson` (FeatureCollection of
polygons in full-resolution px, `properties.cell_id`), `spatial/scalefactors_json.json`. A
cell's centre is its polygon's area centroid; cells are circles of the median area-equivalent
diameter (a section carries one unit size), with no pitch.

Native frame: full-resolution image pixels, `x_native = pxl_col_in_fullres`,
`y_native = pxl_row_in_fullres`. Docs: Space Ranger "Visium HD outputs", "Binned outputs" and
"Segmented outputs" (https://www.10xgenomics.com/support/software/space-ranger/latest/analysis/
outputs); reference reader: scverse/spatialdata-io `readers/visium_hd.py` (VisiumHDKeys).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from histmol.errors import BundleError, ConfigError
from histmol.section import ArrayLattice, Section, UnitShape
from platform_adapters._common import (
    GenePanel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    panel_section,
)
from platform_adapters._tenx import read_scalefactors
from platform_adapters._visium_hd_bins import bin_matrix
from platform_adapters._visium_hd_cells import read_cells
from platform_adapters._visium_hd_positions import PositionGrid, format_barcodes, read_positions

PLATFORM = "visium-hd"
ADAPTER_VERSION = "1"
FINEST_BIN_UM = 2
PITCH_TOLERANCE = 0.02  # fitted bin pitch vs scalefactors
RESIDUAL_LIMIT_BINS = 0.5  # a bin off the fitted affine by more than this is an error


class VisiumHDFiles(StrEnum):
    """Space Ranger HD names, relative to `outs/` (bin folder files relative to the folder)."""

    BINNED_OUTPUTS = "binned_outputs"
    BIN_FOLDER = "square_{bin:03d}um"
    SEGMENTED_OUTPUTS = "segmented_outputs"  # Space Ranger >= 4.0
    MATRIX = "filtered_feature_bc_matrix.h5"
    POSITIONS = "spatial/tissue_positions.parquet"
    SCALEFACTORS = "spatial/scalefactors_json.json"
    HIRES_IMAGE = "spatial/tissue_hires_image.png"
    LOWRES_IMAGE = "spatial/tissue_lowres_image.png"


class VisiumHDKeys(StrEnum):
    """Scale-factor keys of a Visium HD `scalefactors_json.json`."""

    BIN_SIZE_UM = "bin_size_um"
    MICRONS_PER_PIXEL = "microns_per_pixel"
    SPOT_DIAMETER_FULLRES = "spot_diameter_fullres"  # the bin side in full-resolution px
    HIRES_SCALEF = "tissue_hires_scalef"
    LOWRES_SCALEF = "tissue_lowres_scalef"


_BIN_FOLDER = re.compile(r"square_(\d{3})um")


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    bin_um: float = 8.0,
    units: Literal["bins", "cells"] = "bins",
) -> Section:
    """Read a Space Ranger Visium HD bundle into a Section of square bins (or of cells).

    Args:
        bundle: the Space Ranger `outs/` folder, or a folder holding `outs/`.
        wsi: the H&E image the full-resolution pixels refer to (not opened here). When it is the
            bin folder's (or outs') own `tissue_lowres_image.png` / `tissue_hires_image.png`,
            `native_to_wsi` becomes diag(scalef, scalef, 1).
        section_id: defaults to the slug of the bundle folder (the parent's name for `outs/`).
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of matrix barcodes that must have a position (a cell).
        native_to_wsi: explicit 3x3 affine; wins over the lowres/hires rule.
        bin_um: bin side in um, a multiple of 2 (8, 16, 32, ...); ignored for cells.
        units: "bins" (square bins of `bin_um`) or "cells" (Space Ranger 4 segmentation).

    Raises:
        BundleError: a missing or malformed file, or a barcode match rate under the threshold.
        ConfigError: an invalid option.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    folder = bundle_folder(bundle)
    outs = _outs_folder(folder)
    if units == "cells":
        got = _cells(outs, min_match_rate)
    elif units == "bins":
        got = _bins(outs, _bin_size(bin_um), min_match_rate)
    else:
        raise ConfigError(f"units must be 'bins' or 'cells', got {units!r}")
    transform = (explicit if explicit is not None
                 else _image_transform(got.image_folders, wsi, got.scalefactors))
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=got.units,
        panel=got.panel,
        files=got.files,
        layout=got.layout,
        metadata=metadata,
        unit_shape=got.shape,
        unit_size_um=got.size_um,
        pitch_um=got.pitch_um,
        default_mode="grid",
        native_to_wsi=transform,
        native_um_per_unit=got.scalefactors[VisiumHDKeys.MICRONS_PER_PIXEL],
        qc=got.qc,
        array_lattice=got.lattice,
    )


@dataclass(frozen=True)
class _Units:
    """What the bins or the cells reader found, before it becomes a Section."""

    units: pd.DataFrame
    panel: GenePanel
    qc: dict[str, float | int | str | bool]
    files: tuple[Path, ...]
    layout: str
    shape: UnitShape
    size_um: float
    pitch_um: float | None
    scalefactors: Mapping[str, float]
    image_folders: tuple[Path, ...]
    lattice: ArrayLattice | None = None  # bins' array_row/array_col step by the bin side


def _cells(outs: Path, min_match_rate: float) -> _Units:
    """Space Ranger 4 segmented cells: circles of the median cell diameter, no pitch."""
    cells = read_cells(outs / VisiumHDFiles.SEGMENTED_OUTPUTS, min_match_rate=min_match_rate)
    return _Units(cells.units, cells.panel, cells.qc, cells.files, "cells", "circle",
                  cells.unit_size_um, None, cells.scalefactors, (cells.folder,))


def _bins(outs: Path, target: int, min_match_rate: float) -> _Units:
    """Square bins of `target` um, read directly or summed from the finest folder dividing it."""
    source_dir, source_um = _source_folder(outs, target)
    factor = target // source_um
    files = (source_dir / VisiumHDFiles.POSITIONS, source_dir / VisiumHDFiles.SCALEFACTORS,
             source_dir / VisiumHDFiles.MATRIX)
    for path in files:
        if not path.exists():
            raise BundleError(path, f"missing from bin folder {source_dir.name}")
    positions_file, scalefactors_file, matrix_file = files
    scalefactors = _read_scalefactors(scalefactors_file, source_um)
    grid = read_positions(positions_file, source_um, keep_pixels=factor == 1)
    qc = _grid_qc(grid, scalefactors, scalefactors_file)
    binned = bin_matrix(matrix_file, grid, factor=factor, min_match_rate=min_match_rate)
    if factor == 1 and grid.x is not None and grid.y is not None:
        cell = (binned.row - grid.row0, binned.col - grid.col0)
        x, y = grid.x[cell], grid.y[cell]
    else:
        centre = (factor - 1) / 2.0  # a new bin's centre: the image of its array-index centre
        x, y = grid.apply_fit(binned.col * factor + centre, binned.row * factor + centre)
    units = pd.DataFrame({
        "unit_id": pd.arrays.ArrowExtensionArray(format_barcodes(binned.row, binned.col, target)),
        "x_native": np.asarray(x, np.float64),
        "y_native": np.asarray(y, np.float64),
        "array_row": binned.row.astype(np.int32),
        "array_col": binned.col.astype(np.int32),
        "n_source_bins": binned.n_source_bins.astype(np.int32),
    })
    panel = binned.panel
    qc.update(
        bin_um=target, source_bin_um=source_um, aggregated=factor > 1, bin_folder=source_dir.name,
        n_matrix_barcodes=binned.n_barcodes, n_matched_barcodes=binned.n_matched,
        barcode_match_rate=binned.n_matched / binned.n_barcodes,
        n_matrix_barcodes_not_in_tissue=binned.n_not_in_tissue,
        n_features_not_gene_expression=binned.n_features - len(binned.feature_ids),
        n_control_probes=panel.n_controls,
    )
    layout = source_dir.name if factor == 1 else f"{source_dir.name}->square_{target:03d}um"
    lattice = ArrayLattice("array_col", "array_row", float(target), float(target))
    return _Units(units, panel, qc, files, layout, "square", float(target), float(target),
                  scalefactors, (source_dir, outs), lattice)


def _outs_folder(folder: Path) -> Path:
    """`folder` itself when it holds binned_outputs/ or segmented_outputs/, else its `outs/`."""
    for candidate in (folder, folder / "outs"):
        if any(
            (candidate / d).is_dir()
            for d in (VisiumHDFiles.BINNED_OUTPUTS, VisiumHDFiles.SEGMENTED_OUTPUTS)
        ):
            return candidate
    raise BundleError(
        folder,
        (
            f"not a Space Ranger Visium HD output: no '{VisiumHDFiles.BINNED_OUTPUTS}/' or "
            f"'{VisiumHDFiles.SEGMENTED_OUTPUTS}/' here or in 'outs/'"
        ),
    )


def _bin_size(bin_um: float | str) -> int:
    """Check the bin side and return it as an int (the CLI hands options over as strings)."""
    try:
        value = float(bin_um)
    except (TypeError, ValueError):
        value = float("nan")
    if not value >= FINEST_BIN_UM or value != round(value) or round(value) % FINEST_BIN_UM:
        raise ConfigError(
            f"bin_um must be a multiple of {FINEST_BIN_UM} um (8, 16, 32, ...), got {bin_um!r}"
        )
    return int(round(value))


def _source_folder(outs: Path, target: int) -> tuple[Path, int]:
    """Find the folder of `target` um bins, else the finest one whose size divides `target`."""
    binned = outs / VisiumHDFiles.BINNED_OUTPUTS
    if not binned.is_dir():
        raise BundleError(binned, "missing: no binned outputs in this bundle (use units='cells'?)")
    sizes = {
        int(m.group(1)): d
        for d in binned.iterdir()
        if d.is_dir() and (m := _BIN_FOLDER.fullmatch(d.name)) and int(m.group(1)) > 0
    }
    if target in sizes:
        return sizes[target], target
    usable = sorted(s for s in sizes if target % s == 0)
    if not usable:
        found = sorted(d.name for d in binned.iterdir())
        raise BundleError(
            binned,
            (
                f"no bin folder for {target} um bins: expected "
                f"{VisiumHDFiles.BIN_FOLDER.format(bin=target)} "
                f"or a square_XXXum folder whose size divides {target}; found {found}"
            ),
        )
    return sizes[usable[0]], usable[0]


def _read_scalefactors(path: Path, bin_um: int) -> dict[str, float]:
    values = read_scalefactors(path)
    keys = VisiumHDKeys
    needed = [keys.BIN_SIZE_UM, keys.MICRONS_PER_PIXEL, keys.SPOT_DIAMETER_FULLRES]
    missing = [k.value for k in needed if not values.get(k, 0) > 0]
    if missing:
        raise BundleError(path, f"lacks positive numeric keys {missing}; found {sorted(values)}")
    if values[keys.BIN_SIZE_UM] != bin_um:
        raise BundleError(
            path,
            (
                f"bin_size_um is {values[keys.BIN_SIZE_UM]:g} but the folder is "
                f"{VisiumHDFiles.BIN_FOLDER.format(bin=bin_um)}: a bin folder of another size?"
            ),
        )
    side_um = values[keys.SPOT_DIAMETER_FULLRES] * values[keys.MICRONS_PER_PIXEL]
    if abs(side_um / bin_um - 1) > 1e-3:
        raise BundleError(
            path,
            (
                f"spot_diameter_fullres x microns_per_pixel is {side_um:.4f} um, not the "
                f"{bin_um} um bin_size_um: the scale factors disagree"
            ),
        )
    return values


def _grid_qc(
    grid: PositionGrid, scalefactors: Mapping[str, float], path: Path
) -> dict[str, float | int | str | bool]:
    """QC of the positions grid; a fitted pitch or residual out of bounds is an error."""
    qc: dict[str, float | int | str | bool] = {
        f"scalefactor_{k}": v for k, v in scalefactors.items()
    }
    qc.update(
        n_position_rows=grid.n_rows,
        n_positions_in_tissue=grid.n_in_tissue,
        positions_grid_rows=grid.state.shape[0],
        positions_grid_cols=grid.state.shape[1],
        positions_grid_complete=grid.complete,
        positions_column_order=grid.column_order,
    )
    if grid.fit is None:
        return qc
    mpp = scalefactors[VisiumHDKeys.MICRONS_PER_PIXEL]
    pitch_px = float(np.sqrt(abs(np.linalg.det(grid.fit[:, :2]))))
    bin_um = scalefactors[VisiumHDKeys.BIN_SIZE_UM]
    qc.update(
        array_fit_pitch_px=pitch_px,
        array_fit_pitch_um=pitch_px * mpp,
        array_fit_residual_rms_px=grid.residual_rms_px,
        array_fit_residual_max_px=grid.residual_max_px,
    )
    if abs(pitch_px * mpp / bin_um - 1) > PITCH_TOLERANCE:
        raise BundleError(
            path,
            (
                f"bins are {pitch_px:.3f} px apart in {grid.path.name} ({pitch_px * mpp:.3f} um at "
                f"microns_per_pixel {mpp:g}) but bin_size_um is {bin_um:g}: the scale factors "
                "do not belong to these positions"
            ),
        )
    if grid.residual_max_px > RESIDUAL_LIMIT_BINS * pitch_px:
        raise BundleError(
            grid.path,
            (
                f"pixel positions are not an affine image of array_row/array_col: a bin lies "
                f"{grid.residual_max_px:.2f} px off the least-squares fit (bins are "
                f"{pitch_px:.2f} px apart)"
            ),
        )
    return qc


def _image_transform(
    folders: tuple[Path, ...], wsi: str | os.PathLike[str], scalefactors: Mapping[str, float]
) -> np.ndarray | None:
    """diag(s, s, 1) when `wsi` is one of the bundle's lowres/hires PNGs, else None (full-res)."""
    target = Path(wsi).resolve()
    for folder in folders:
        for image, key in (
            (VisiumHDFiles.LOWRES_IMAGE, VisiumHDKeys.LOWRES_SCALEF),
            (VisiumHDFiles.HIRES_IMAGE, VisiumHDKeys.HIRES_SCALEF),
        ):
            if (folder / image).resolve() == target and key in scalefactors:
                scale = scalefactors[key]
                return np.diag([scale, scale, 1.0])
    return None
