"""10x Genomics Xenium adapter: segmented cells, or transcripts binned on a square grid.

Reads a Xenium Onboard Analysis (XOA) output folder:

- `units="cells"`: `cell_feature_matrix.h5` (10x HDF5) or `cell_feature_matrix/` (MEX), joined
  by cell_id to `cells.parquet` or `cells.csv.gz` (x_centroid, y_centroid in um; cell_area um^2).
- `units="bins"`: `transcripts.parquet` (or `.csv.gz`): feature_name, x_location, y_location
  (um), qv. Read batch by batch, kept where qv >= min_qv, spilled by bands of bin rows and
  summed one band at a time (`histmol.binning.BandedBinner`) onto disk (`CountsStore`), so memory
  follows one band, not the section. Bins are anchored at (0, 0) um, in (row, col) order.
- Control codewords (NegControlProbe_, NegControlCodeword_, UnassignedCodeword_,
  DeprecatedCodeword_, BLANK_, Intergenic_Region_) are dropped from expression by name
  (`histmol.genes`); their per-unit totals are kept as control counts. Bins holding only control
  hits are dropped and counted in QC.
- H&E placement: `*he_imagealignment.csv`, the 3x3 affine Xenium Explorer exports, mapping H&E
  image pixels to morphology-image pixels (level 0); `experiment.xenium` gives `pixel_size`
  (um per morphology pixel). So um -> H&E px = inv(alignment) @ diag(1/pixel_size, 1/pixel_size,
  1).
  Or a Xenium Explorer keypoints CSV (fixedX, fixedY on the morphology image; alignmentX,
  alignmentY on the H&E; Xenium Explorer >= 2.0 may save it under the alignment file's name),
  fitted by least squares over all pairs (`histmol.landmarks`), residuals in QC.

Native frame: Xenium micrometres (cell centroids and transcript locations), 1 um per unit.
Cells are circles whose diameter is that of a disc with the median cell area (the typical cell,
robust to segmentation outliers); their pitch is None (cells are not on a lattice).

Format docs: XOA "Understanding Xenium Outputs"
(https://www.10xgenomics.com/support/software/xenium-onboard-analysis/latest/analysis/xoa-output-understanding-outputs);
10x KB "How can I convert coordinates between H&E image and Xenium data" (alignment matrix: H&E px
-> Xenium px; um = px x pixel_size). Reference readers: scverse/spatialdata-io `readers/xenium.py`
(file names, `he_image.ome.tif` <-> `he_imagealignment.csv`), mahmoodlab/HEST
`read_xenium_alignment` (keypoints columns).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from histmol.binning import BandedBinner
from histmol.errors import BundleError, ConfigError, RegistrationError
from histmol.genes import control_category
from histmol.landmarks import check_residuals, fit_affine
from histmol.registration import check_affine, median_neighbour_distance
from histmol.section import Section
from platform_adapters._banded import banded_units
from platform_adapters._common import (
    GenePanel,
    StreamedPanel,
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
from platform_adapters._tenx import GENE_EXPRESSION, read_10x_matrix

PLATFORM = "xenium"
ADAPTER_VERSION = "1"
BATCH_ROWS = 1 << 20  # transcripts per batch: ~30 MB of columns in flight
MAX_KEYPOINT_RESIDUAL_UM = 25.0  # a quarter of a 112 um patch: worse means a misplaced keypoint


class XeniumFiles(StrEnum):
    """XOA file names, relative to the output folder."""

    EXPERIMENT = "experiment.xenium"
    MATRIX_H5 = "cell_feature_matrix.h5"
    MATRIX_MEX = "cell_feature_matrix"
    CELLS_PARQUET = "cells.parquet"
    CELLS_CSV = "cells.csv.gz"
    TRANSCRIPTS_PARQUET = "transcripts.parquet"
    TRANSCRIPTS_CSV = "transcripts.csv.gz"
    ALIGNMENT_GLOB = "*he_imagealignment.csv"


class XeniumKeys(StrEnum):
    """Column and manifest keys."""

    PIXEL_SIZE = "pixel_size"
    SOFTWARE = "analysis_sw_version"
    CELL_ID = "cell_id"
    CELL_X = "x_centroid"
    CELL_Y = "y_centroid"
    CELL_AREA = "cell_area"
    FEATURE = "feature_name"
    TX_X = "x_location"
    TX_Y = "y_location"
    QV = "qv"
    FIXED_X = "fixedX"  # keypoints: morphology image px
    FIXED_Y = "fixedY"
    MOVING_X = "alignmentX"  # keypoints: H&E image px
    MOVING_Y = "alignmentY"


TRANSCRIPT_COLUMNS = tuple(str(k) for k in (XeniumKeys.FEATURE, XeniumKeys.TX_X,
                                            XeniumKeys.TX_Y, XeniumKeys.QV))
QC = dict[str, float | int | str | bool]


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
    alignment: str | os.PathLike[str] | None = None,
    keypoints: str | os.PathLike[str] | None = None,
    min_qv: float = 20.0,
) -> Section:
    """Read a Xenium output folder into a Section in Xenium micrometres.

    Args:
        bundle: the XOA output folder (holding cell_feature_matrix.h5, cells.*, transcripts.*).
        wsi: the H&E image the alignment refers to (not opened here).
        section_id: defaults to the slug of the bundle folder's name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of matrix cell ids found in the cells table.
        native_to_wsi: explicit um -> H&E px affine; no alignment file is then needed.
        units: "cells" (segmented cells) or "bins" (transcripts binned at `bin_um`).
        bin_um: bin side in um for `units="bins"`.
        alignment: the `*he_imagealignment.csv` (autodetected in the bundle when not given).
        keypoints: a Xenium Explorer keypoints CSV, instead of an alignment matrix.
        min_qv: transcripts under this Phred quality are ignored (XOA uses 20).

    Raises:
        BundleError: a missing or malformed file, or a cell-id match rate under the threshold.
        RegistrationError: a singular or mirrored alignment, or keypoints that do not fit.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    if units not in ("cells", "bins"):
        raise ConfigError(f"units must be 'cells' or 'bins', got {units!r}")
    if not float(bin_um) > 0:
        raise ConfigError(f"bin_um must be > 0, got {bin_um}")
    if not float(min_qv) >= 0:
        raise ConfigError(f"min_qv must be >= 0, got {min_qv}")
    if alignment is not None and keypoints is not None:
        raise ConfigError("give alignment or keypoints, not both")
    folder = bundle_folder(bundle)
    if explicit is not None:
        matrix, place_qc, place_files = explicit, {"placement": "explicit"}, []
    else:
        matrix, place_qc, place_files = _placement(folder, alignment, keypoints)
    parts = (_cells(folder, min_match_rate) if units == "cells"
             else _bins(folder, float(bin_um), float(min_qv)))
    units_table, panel, files, qc, (shape, size_um, pitch_um) = parts
    qc.update(place_qc)
    used = [*files, *place_files]
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=units_table,
        panel=panel,
        files=used,
        layout=_software_version(folder),
        metadata=metadata,
        unit_shape=shape,
        unit_size_um=size_um,
        pitch_um=pitch_um,
        default_mode="grid",
        native_to_wsi=matrix,
        native_um_per_unit=1.0,
        qc=qc,
    )


# -- H&E placement ---------------------------------------------------------------------------


def _placement(
    folder: Path, alignment: str | os.PathLike[str] | None, keypoints: str | os.PathLike[str] | None
) -> tuple[np.ndarray, QC, list[Path]]:
    """Micrometres -> H&E px from the alignment matrix or keypoints, with QC and files used."""
    if keypoints is not None:
        path, is_keypoints = explicit_file(keypoints, "keypoints CSV"), True
    else:
        if alignment is not None:
            path = explicit_file(alignment, "H&E alignment CSV")
        else:
            found = sorted(folder.glob(str(XeniumFiles.ALIGNMENT_GLOB)))
            if not found:
                raise BundleError(
                    folder,
                    f"no H&E alignment: looked for {XeniumFiles.ALIGNMENT_GLOB} (the 3x3 "
                    "H&E -> morphology-pixel matrix Xenium Explorer exports, e.g. "
                    f"<sample>_he_imagealignment.csv) in {folder}; give --alignment FILE, "
                    "--option keypoints=FILE (Xenium Explorer keypoints) or --transform FILE "
                    "(3x3 um -> H&E px)",
                )
            if len(found) > 1:
                names = [p.name for p in found]
                raise BundleError(
                    folder, f"several H&E alignment files {names}; choose one with --alignment"
                )
            path = found[0]
        is_keypoints = "fixedx" in first_line(path).lower()
    pixel_size, experiment = _pixel_size(folder, path)
    if is_keypoints:
        to_morphology, qc = _fit_keypoints(path, pixel_size)
    else:
        to_morphology, qc = read_transform(path), {"placement": "alignment_matrix"}
    det = check_affine(to_morphology, what=f"{path} (H&E -> morphology px alignment)")
    if det < 0:
        raise RegistrationError(
            f"{path}: the H&E alignment mirrors the image (determinant {det:.4g}); Xenium "
            "Explorer alignments rotate, scale and shift but never flip: check the file"
        )
    scale = np.diag([1.0 / pixel_size, 1.0 / pixel_size, 1.0])
    qc.update(alignment_file=path.name, morphology_pixel_size_um=pixel_size)
    return np.linalg.inv(to_morphology) @ scale, qc, [path, experiment]


def _pixel_size(folder: Path, alignment_file: Path) -> tuple[float, Path]:
    """Micrometres per morphology pixel, from experiment.xenium (to read an alignment in um)."""
    path = folder / XeniumFiles.EXPERIMENT
    if not path.exists():
        raise BundleError(
            path,
            f"missing; its pixel_size is needed to turn {alignment_file.name} (morphology "
            "pixels) into micrometres",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        value = float(manifest[XeniumKeys.PIXEL_SIZE])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BundleError(path, f"cannot read a numeric pixel_size: {err!r}") from err
    if not 0.01 < value < 10:
        raise BundleError(path, f"pixel_size {value} um is not a plausible microscope pixel size")
    return value, path


def _fit_keypoints(path: Path, pixel_size: float) -> tuple[np.ndarray, QC]:
    """H&E px -> morphology px fitted over all keypoint pairs; residuals must stay small."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as CSV: {err}") from err
    keys = XeniumKeys
    wanted = [str(k) for k in (keys.FIXED_X, keys.FIXED_Y, keys.MOVING_X, keys.MOVING_Y)]
    require_columns(table, wanted, path, "keypoints table")
    values = table[[keys.MOVING_X, keys.MOVING_Y, keys.FIXED_X, keys.FIXED_Y]].apply(
        pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise BundleError(path, "keypoint coordinates hold non-numeric or missing values")
    try:
        fit = fit_affine(values[:, :2], values[:, 2:])
        worst_um = check_residuals(fit, MAX_KEYPOINT_RESIDUAL_UM, pixel_size)
    except RegistrationError as err:
        raise RegistrationError(f"{path}: {err}") from err
    qc: QC = {"placement": "keypoints_fit", "keypoints_n": fit.n_pairs,
              "keypoints_rms_um": fit.rms * pixel_size, "keypoints_max_um": worst_um}
    return fit.matrix, qc


# -- cells -----------------------------------------------------------------------------------

Geometry = tuple[Literal["circle", "square"], float, float | None]  # shape, size um, pitch um
Parts = tuple[pd.DataFrame, GenePanel, list[Path], QC, Geometry]


def _cells(folder: Path, min_match_rate: float) -> Parts:
    """Cells of the cell-feature matrix placed at their centroids."""
    matrix_path = _first_existing(folder, (XeniumFiles.MATRIX_H5, XeniumFiles.MATRIX_MEX),
                                  "cell-feature matrix")
    cells_path = _first_existing(folder, (XeniumFiles.CELLS_PARQUET, XeniumFiles.CELLS_CSV),
                                 "cells table")
    matrix = read_10x_matrix(matrix_path)
    cells = _read_cells(cells_path)
    join = inner_join_ids(matrix.barcodes, cells[XeniumKeys.CELL_ID].to_numpy(),
                          matrix_file=matrix_path, positions_file=cells_path,
                          min_match_rate=min_match_rate, what="cell ids")
    names = matrix.feature_names.astype(str)
    controls = np.array([control_category(n) is not None for n in names], dtype=bool)
    keep = np.flatnonzero((matrix.feature_types == GENE_EXPRESSION) | controls)
    counts = sp.csr_matrix(matrix.counts[join.matrix_index][:, keep])
    panel = build_gene_panel(matrix.feature_ids[keep], names[keep], counts)
    placed = cells.iloc[join.positions_index].reset_index(drop=True)
    units = pd.DataFrame({
        "unit_id": placed[XeniumKeys.CELL_ID].to_numpy(object),
        "x_native": placed[XeniumKeys.CELL_X].to_numpy(np.float64),
        "y_native": placed[XeniumKeys.CELL_Y].to_numpy(np.float64),
    })
    if XeniumKeys.CELL_AREA in placed:
        units["cell_area_um2"] = placed[XeniumKeys.CELL_AREA].to_numpy(np.float64)
    diameter, source = _cell_diameter(placed)
    qc: QC = {
        "units": "cells", "matrix_source": matrix_path.name, "cells_source": cells_path.name,
        "n_matrix_cells": join.n_matrix, "n_matched_cells": join.n_matched,
        "cell_match_rate": join.match_rate, "n_cells_table_rows": len(cells),
        "n_features_not_rna": len(names) - len(keep), "n_control_probes": panel.n_controls,
        "unit_size_source": source,
    }
    return units, panel, [matrix_path, cells_path], qc, ("circle", diameter, None)


def _read_cells(path: Path) -> pd.DataFrame:
    """cell_id (str), centroids and, when present, cell_area."""
    keys = XeniumKeys
    wanted = [str(k) for k in (keys.CELL_ID, keys.CELL_X, keys.CELL_Y)]
    try:
        if path.name.endswith(".parquet"):
            names = pq.ParquetFile(path).schema_arrow.names
            columns = [c for c in [*wanted, keys.CELL_AREA] if c in names]
            frame = pq.read_table(path, columns=columns).to_pandas()
        else:
            frame = pd.read_csv(path, dtype={keys.CELL_ID: str})
    except (OSError, ValueError, EOFError, pa.ArrowException, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read cells table (truncated or corrupt?): {err}") from err
    require_columns(frame, wanted, path, "cells table")
    frame[keys.CELL_ID] = [_text(v) for v in frame[keys.CELL_ID]]
    numeric = [c for c in (keys.CELL_X, keys.CELL_Y, keys.CELL_AREA) if c in frame]
    converted = frame[numeric].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(converted[[keys.CELL_X, keys.CELL_Y]].to_numpy(np.float64)).all():
        raise BundleError(path, "x_centroid / y_centroid hold non-numeric or missing values")
    frame[numeric] = converted
    return frame


def _cell_diameter(cells: pd.DataFrame) -> tuple[float, str]:
    """Diameter of the disc with the median cell area, else the median nearest-cell distance."""
    if XeniumKeys.CELL_AREA in cells:
        area = cells[XeniumKeys.CELL_AREA].to_numpy(np.float64)
        if np.isfinite(area).any() and np.nanmedian(area) > 0:
            return float(2.0 * np.sqrt(np.nanmedian(area) / np.pi)), "median_cell_area"
    distance = median_neighbour_distance(cells[XeniumKeys.CELL_X].to_numpy(np.float64),
                                         cells[XeniumKeys.CELL_Y].to_numpy(np.float64))
    return float(distance or 10.0), "median_neighbour_distance"


# -- bins ------------------------------------------------------------------------------------


def _bins(folder: Path, bin_um: float, min_qv: float) -> Parts:
    """Transcripts of quality >= min_qv summed into square bins of `bin_um`."""
    path = _first_existing(folder, (XeniumFiles.TRANSCRIPTS_PARQUET, XeniumFiles.TRANSCRIPTS_CSV),
                           "transcripts table")
    names = sorted(_feature_names(path))
    if not names:
        raise BundleError(path, "holds no transcripts")
    index = {name: i for i, name in enumerate(names)}
    binner = BandedBinner(len(names), bin_um)
    try:
        n_read, n_low = _spill_transcripts(path, binner, index, min_qv)
    except BaseException:
        binner.close()
        raise
    ids = _feature_ids(folder)
    streamed = StreamedPanel.of([ids.get(n, n) for n in names], names)
    units, panel, n_controls_only, n_control = banded_units(binner, streamed, bin_um)
    qc: QC = {
        "units": "bins", "bin_um": bin_um, "min_qv": min_qv, "transcripts_source": path.name,
        "n_transcripts": n_read, "n_transcripts_below_qv": n_low,
        "n_transcripts_control": n_control, "n_bins": len(units),
        "n_bins_controls_only": n_controls_only, "n_control_probes": panel.n_controls,
    }
    return units, panel, [path], qc, ("square", bin_um, bin_um)


def _spill_transcripts(path: Path, binner: BandedBinner, index: dict[str, int],
                       min_qv: float) -> tuple[int, int]:
    """Feed transcripts of quality >= min_qv to `binner`; return (read, below min_qv)."""
    n_read = n_low = 0
    for batch in _batches(path, TRANSCRIPT_COLUMNS):
        qv = batch.column(XeniumKeys.QV).to_numpy(zero_copy_only=False)
        keep = np.flatnonzero(qv >= min_qv)
        n_read, n_low = n_read + len(qv), n_low + len(qv) - len(keep)
        genes = _codes(batch.column(XeniumKeys.FEATURE), index)[keep]
        x = batch.column(XeniumKeys.TX_X).to_numpy(zero_copy_only=False)[keep]
        y = batch.column(XeniumKeys.TX_Y).to_numpy(zero_copy_only=False)[keep]
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise BundleError(path, "x_location / y_location hold NaN or infinite values")
        try:
            binner.add_points(x, y, genes)
        except ValueError as err:  # coordinates not in um (e.g. pixels), far off the origin
            raise BundleError(path, f"x_location / y_location: {err}") from err
    return n_read, n_low


def _batches(path: Path, columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    """Record batches of the named columns; Parquet one batch at a time, CSV in chunks."""
    try:
        if path.name.endswith(".parquet"):
            reader = pq.ParquetFile(path, read_dictionary=[XeniumKeys.FEATURE])
            found = reader.schema_arrow.names
            if missing := [c for c in columns if c not in found]:
                raise BundleError(path, f"lacks columns {missing}; found columns {found}")
            yield from reader.iter_batches(batch_size=BATCH_ROWS, columns=list(columns))
            return
        header = pd.read_csv(path, nrows=0).columns
        require_columns(pd.DataFrame(columns=header), columns, path, "transcripts table")
        for chunk in pd.read_csv(path, usecols=list(columns), chunksize=BATCH_ROWS,
                                 dtype={XeniumKeys.FEATURE: str}):
            yield pa.RecordBatch.from_pandas(chunk[list(columns)], preserve_index=False)
    except (OSError, EOFError, ValueError, pa.ArrowException, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read transcripts (truncated or corrupt?): {err}") from err


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _feature_names(path: Path) -> set[str]:
    """Every feature name in the transcripts (a pass over that column alone)."""
    names: set[str] = set()
    for batch in _batches(path, (XeniumKeys.FEATURE,)):
        column = batch.column(0)
        if column.null_count:
            raise BundleError(path, f"{column.null_count} transcripts have no feature_name")
        values = column.dictionary if pa.types.is_dictionary(column.type) else pc.unique(column)
        names.update(_text(v) for v in values.to_pylist())
    return names


def _codes(column: pa.Array, index: dict[str, int]) -> np.ndarray:
    """Feature index (into the sorted names) of every transcript."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    lookup = np.array([index[_text(v)] for v in column.dictionary.to_pylist()], dtype=np.int64)
    return lookup[column.indices.to_numpy(zero_copy_only=False)]


def _feature_ids(folder: Path) -> dict[str, str]:
    """Map feature name -> id (Ensembl) from the cell-feature matrix's features, if present."""
    h5 = folder / XeniumFiles.MATRIX_H5
    if h5.exists():
        try:
            with h5py.File(h5, "r") as handle:
                group = handle["matrix/features"]
                ids, names = group["id"][()], group["name"][()]
        except (OSError, KeyError) as err:
            raise BundleError(h5, f"cannot read features (truncated or corrupt?): {err}") from err
        return {_text(n): _text(i) for i, n in zip(ids, names, strict=True)}
    for name in ("features.tsv.gz", "features.tsv"):
        path = folder / XeniumFiles.MATRIX_MEX / name
        if path.exists():
            try:
                table = pd.read_csv(path, sep="\t", header=None, dtype=str)
                return dict(zip(table[1], table[0], strict=True))
            except (OSError, EOFError, ValueError, KeyError, pd.errors.ParserError) as err:
                raise BundleError(path, f"cannot read the feature list: {err}") from err
    return {}


# -- helpers ---------------------------------------------------------------------------------


def _first_existing(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).exists():
            return folder / name
    raise BundleError(folder, f"no {what}: looked for {', '.join(names)} in {folder}")


def _software_version(folder: Path) -> str:
    """XOA version from experiment.xenium, for provenance ("unknown" without the manifest)."""
    path = folder / XeniumFiles.EXPERIMENT
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get(XeniumKeys.SOFTWARE, "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"
