"""Seq-Scope adapter: the NovaScope spatial gene expression (SGE) matrix, binned to squares.

Reads an SGE folder as NovaScope's rule `dge2sdge` writes it
(`<output>/align/<flowcell>/<chip>/<run>/sge/`; https://seqscope.github.io/NovaScope/ ->
"Rule dge2sdge"), given as the bundle or as the bundle's `sge/` child:

- `barcodes.tsv.gz`: no header, 8 tab-separated columns: sorted spatial (HDMI) barcode, its
  1-based index used in `matrix.mtx.gz`, its index in the STARsolo output, lane (1), tile (1),
  X and Y (global chip coordinates; NovaScope's `barcodes.minmax.tsv` states them "in
  nanometers"), and five comma-separated per-barcode totals.
- `features.tsv.gz`: no header: gene id, symbol, 1-based index used in `matrix.mtx.gz`, five
  comma-separated totals.
- `matrix.mtx.gz`: a MatrixMarket coordinate header and dimensions line (features, barcodes,
  entries), then one line per non-zero entry: feature index, barcode index and five counts, in
  the order Gene, GeneFull, Spliced, Unspliced, Ambiguous. A plain 10x MEX matrix with a single
  count column is read too.

The same columns drive seqscope/cartloader `sge_convert --platform seqscope` (barcode x in
column 6, y in column 7, `--units-per-um 1000`, count column 1 = Gene by default).

Units: square bins of `bin_um` (default 8 um) laid from the SGE origin: a Seq-Scope pixel is a
~0.6 um sequencing cluster, far below a patch's resolution. Counts are streamed entry chunk by
chunk into `histmol.binning.BinAccumulator`, so memory follows the number of non-empty
(bin, gene) pairs. Native frame: the SGE's own coordinates (nanometres), so `native_to_wsi`,
`histmol build --transform` (3 lines of 3 numbers) and `--landmarks` (native_x/native_y in nm)
map SGE coordinates to H&E level-0 pixels; NovaScope's `historef` stores that mapping as a
GeoTIFF's georeference, which is not read here. The MatrixMarket file is parsed directly with
pandas because scipy's reader takes one value per entry, not five.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from histmol.binning import BinAccumulator, BinnedCounts
from histmol.errors import BundleError, ConfigError
from histmol.section import Section
from platform_adapters._binned import binned_units, check_bin_um
from platform_adapters._common import (
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    first_line,
    open_text,
    panel_section,
)
from platform_adapters._counts import check_counts

PLATFORM = "seq-scope"
ADAPTER_VERSION = "1"

DEFAULT_BIN_UM = 8.0
NANOMETRES_PER_UM = 1000.0
ENTRY_CHUNK = 2_000_000  # matrix entries parsed at a time
CountColumn = Literal["Gene", "GeneFull", "Spliced", "Unspliced", "Ambiguous"]
COUNT_COLUMNS: tuple[str, ...] = ("Gene", "GeneFull", "Spliced", "Unspliced", "Ambiguous")


class SgeFiles(StrEnum):
    """File names of a NovaScope SGE folder."""

    FOLDER = "sge"
    BARCODES = "barcodes.tsv.gz"
    FEATURES = "features.tsv.gz"
    MATRIX = "matrix.mtx.gz"


class BarcodeColumns:
    """0-based column positions in `barcodes.tsv.gz` (NovaScope dge2sdge)."""

    INDEX = 1
    X = 5
    Y = 6
    MIN_COLUMNS = 7


class FeatureColumns:
    """0-based column positions in `features.tsv.gz`."""

    ID = 0
    NAME = 1
    INDEX = 2
    MIN_COLUMNS = 3


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    count_column: CountColumn = "Gene",
    bin_um: float = DEFAULT_BIN_UM,
    units_per_um: float = NANOMETRES_PER_UM,
) -> Section:
    """Read a NovaScope SGE folder into a Section of `bin_um` square bins.

    Args:
        bundle: the `sge/` folder (barcodes.tsv.gz, features.tsv.gz, matrix.mtx.gz) or a folder
            holding it.
        wsi: the H&E image (not opened here).
        section_id: defaults to the slug of the bundle folder name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of the barcodes the matrix uses that must be listed,
            with coordinates, in barcodes.tsv.gz.
        native_to_wsi: 3x3 affine, SGE coordinates -> WSI level-0 pixels (`histmol build
            --transform` passes its file here; or build with --landmarks).
        count_column: which of the five NovaScope counts is expression (Gene: exonic, the
            cartloader default; GeneFull adds intronic reads).
        bin_um: bin side in micrometres.
        units_per_um: SGE coordinate units per micrometre (1000: nanometres).

    Raises:
        BundleError: a missing or malformed file, indices out of range, or a barcode match rate
            under the threshold.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    bin_um = check_bin_um(bin_um)
    if count_column not in COUNT_COLUMNS:
        raise ConfigError(f"count_column must be one of {COUNT_COLUMNS}, got {count_column!r}")
    if not float(units_per_um) > 0:
        raise ConfigError(f"units_per_um must be positive, got {units_per_um!r}")
    folder = bundle_folder(bundle)
    sge = _sge_folder(folder)
    barcodes_file, features_file, matrix_file = (
        sge / SgeFiles.BARCODES,
        sge / SgeFiles.FEATURES,
        sge / SgeFiles.MATRIX,
    )
    header = _read_matrix_header(matrix_file)
    feature_ids, feature_names = _read_features(features_file, header.n_features)
    coords = _read_barcodes(barcodes_file, header.n_barcodes)
    binned, stats = _bin_entries(
        matrix_file, header, coords / float(units_per_um), count_column, bin_um
    )
    if stats.matched_barcodes < min_match_rate * stats.used_barcodes:
        raise BundleError(
            matrix_file,
            f"only {stats.matched_barcodes} of the {stats.used_barcodes} barcodes it uses "
            f"({stats.matched_barcodes / stats.used_barcodes:.2%}) are listed with coordinates in "
            f"{barcodes_file}; min_match_rate is {min_match_rate:.2%}",
        )
    if binned.n_bins == 0:
        raise BundleError(matrix_file, f"holds no non-zero {count_column} counts")
    panel = build_gene_panel(feature_ids, feature_names, binned.counts)
    files = [barcodes_file, features_file, matrix_file]
    qc: dict[str, float | int | str | bool] = {
        "count_column": count_column if header.n_values == len(COUNT_COLUMNS) else "single",
        "n_sge_barcodes": int(np.isfinite(coords[:, 0]).sum()),
        "n_matrix_entries": header.n_entries,
        "n_entries_zero_in_column": stats.zero_entries,
        "barcode_match_rate": stats.matched_barcodes / max(stats.used_barcodes, 1),
        "n_entries_without_coordinates": stats.unmatched_entries,
        "n_bins": binned.n_bins,
        "bin_um": bin_um,
        "n_control_probes": panel.n_controls,
        "has_transform": explicit is not None,
    }
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=binned_units(binned, 1.0 / float(units_per_um)),
        panel=panel,
        files=files,
        layout="novascope_sge",
        metadata=metadata,
        unit_shape="square",
        unit_size_um=bin_um,
        pitch_um=bin_um,
        default_mode="grid",
        native_to_wsi=explicit,
        native_um_per_unit=1.0 / float(units_per_um),
        qc=qc,
    )


def _sge_folder(folder: Path) -> Path:
    """`folder` when it holds the three SGE files, else its `sge/` child when that does."""
    for candidate in (folder, folder / SgeFiles.FOLDER):
        if (candidate / SgeFiles.MATRIX).exists():
            missing = [
                f.value
                for f in (SgeFiles.BARCODES, SgeFiles.FEATURES)
                if not (candidate / f).exists()
            ]
            if missing:
                raise BundleError(candidate, f"SGE folder lacks {missing}")
            return candidate
    raise BundleError(
        folder,
        f"not a NovaScope SGE folder: no {SgeFiles.MATRIX} here or in {SgeFiles.FOLDER}/ (expected "
        f"{SgeFiles.BARCODES}, {SgeFiles.FEATURES}, {SgeFiles.MATRIX})",
    )


@dataclass(frozen=True)
class _MatrixHeader:
    n_features: int
    n_barcodes: int
    n_entries: int
    skip_lines: int
    n_values: int


def _read_matrix_header(path: Path) -> _MatrixHeader:
    """Read the dimensions, the lines before the entries and the number of count columns."""
    try:
        with open_text(path) as handle:
            banner = handle.readline()
            if not banner.startswith("%%MatrixMarket matrix coordinate"):
                raise BundleError(path, f"not a MatrixMarket coordinate file: {banner.strip()!r}")
            skip, line = 1, handle.readline()
            while line.startswith("%"):
                skip, line = skip + 1, handle.readline()
            entry = handle.readline().split()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BundleError(path, f"cannot read: {err}") from err
    try:
        n_features, n_barcodes, n_entries = (int(v) for v in line.split())
    except ValueError as err:
        raise BundleError(path, f"bad dimensions line {line.strip()!r}: {err}") from err
    n_values = len(entry) - 2
    if n_entries and n_values not in (1, len(COUNT_COLUMNS)):
        raise BundleError(
            path,
            f"entries have {len(entry)} columns; expected feature, barcode and 5 counts "
            f"({', '.join(COUNT_COLUMNS)}) or a single count",
        )
    return _MatrixHeader(n_features, n_barcodes, n_entries, skip + 1, max(n_values, 1))


def _read_table(path: Path, min_columns: int) -> pd.DataFrame:
    """Read a headerless tab-separated file of at least `min_columns` columns, as strings."""
    n_columns = len(first_line(path).split("\t"))
    if n_columns < min_columns:
        raise BundleError(
            path, f"has {n_columns} tab-separated columns, expected at least {min_columns}"
        )
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as tab-separated text: {err}") from err


def _indices(values: pd.Series, path: Path, what: str, n: int) -> np.ndarray:
    """0-based positions from a 1-based index column; unique and within 1..n."""
    index = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(index).all() or not np.array_equal(index, np.round(index)):
        raise BundleError(path, f"the {what} index column holds non-integers")
    index = index.astype(np.int64) - 1
    if len(index) and (index.min() < 0 or index.max() >= n):
        raise BundleError(
            path,
            f"{what} indices must lie in 1..{n} (the matrix dimensions), found "
            f"{index.min() + 1}..{index.max() + 1}",
        )
    if len(np.unique(index)) != len(index):
        raise BundleError(path, f"duplicate {what} indices")
    return index


def _read_features(path: Path, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Gene ids and symbols ordered by their matrix index."""
    frame = _read_table(path, FeatureColumns.MIN_COLUMNS)
    if len(frame) != n_features:
        raise BundleError(
            path, f"lists {len(frame)} features but the matrix dimensions say {n_features}"
        )
    order = _indices(frame[FeatureColumns.INDEX], path, "feature", n_features)
    ids = np.empty(n_features, dtype=object)
    names = np.empty(n_features, dtype=object)
    ids[order] = frame[FeatureColumns.ID].to_numpy(object)
    names[order] = frame[FeatureColumns.NAME].to_numpy(object)
    return ids, names


def _read_barcodes(path: Path, n_barcodes: int) -> np.ndarray:
    """(n_barcodes, 2) X, Y by matrix index; NaN for indices the file does not list."""
    n_columns = len(first_line(path).split("\t"))
    if n_columns < BarcodeColumns.MIN_COLUMNS:
        raise BundleError(
            path,
            f"has {n_columns} tab-separated columns, expected at least "
            f"{BarcodeColumns.MIN_COLUMNS} (barcode, index, STARsolo index, lane, tile, X, Y)",
        )
    columns = {
        BarcodeColumns.INDEX: np.int64,
        BarcodeColumns.X: np.float64,
        BarcodeColumns.Y: np.float64,
    }
    try:  # numeric dtypes straight away: a chip lists tens of millions of barcodes
        frame = pd.read_csv(path, sep="\t", header=None, usecols=list(columns), dtype=columns)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"columns 2, 6 and 7 (index, X, Y) must be numbers: {err}") from err
    index = _indices(frame[BarcodeColumns.INDEX], path, "barcode", n_barcodes)
    values = frame[[BarcodeColumns.X, BarcodeColumns.Y]].to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise BundleError(path, "columns 6-7 (X, Y) hold missing or infinite values")
    coords = np.full((n_barcodes, 2), np.nan)
    coords[index] = values
    return coords


@dataclass(frozen=True)
class _EntryStats:
    used_barcodes: int
    matched_barcodes: int
    unmatched_entries: int
    zero_entries: int


def _entry_chunks(path: Path, header: _MatrixHeader) -> Iterator[np.ndarray]:
    """Yield the entries as float64 arrays of at most ENTRY_CHUNK rows (checked by the caller).

    float64, not int64: an int64 parse fails on "2.5" without saying where; `check_counts`
    names the line and the value.
    """
    if header.n_entries == 0:
        return
    try:
        reader = pd.read_csv(
            path,
            sep=r"\s+",  # NovaScope writes single spaces; tolerate tabs and runs
            header=None,
            skiprows=header.skip_lines,
            dtype=np.float64,
            chunksize=ENTRY_CHUNK,
            engine="c",
        )
        with reader:
            for chunk in reader:
                yield chunk.to_numpy()
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot parse the matrix entries as numbers: {err}") from err


def _bin_entries(
    path: Path, header: _MatrixHeader, coords_um: np.ndarray, count_column: str, bin_um: float
) -> tuple[BinnedCounts, _EntryStats]:
    """Stream the entries into bins; check indices, counts and the entry total."""
    column = 2 + (COUNT_COLUMNS.index(count_column) if header.n_values > 1 else 0)
    accumulator = BinAccumulator(max(header.n_features, 1), bin_um)
    used = np.zeros(header.n_barcodes, dtype=bool)
    n_read = unmatched = zero = 0
    for entries in _entry_chunks(path, header):
        if entries.shape[1] != 2 + header.n_values:
            raise BundleError(
                path, f"entries have {entries.shape[1]} columns, expected {2 + header.n_values}"
            )
        first_line = header.skip_lines + n_read + 1
        n_read += len(entries)
        checked = [check_counts(entries[:, c], path,
                                lambda i, c=c, at=first_line: f"line {at + i} (column {c + 1})")
                   for c in range(entries.shape[1])]
        feature, barcode, value = checked[0] - 1, checked[1] - 1, checked[column]
        if feature.min() < 0 or feature.max() >= header.n_features:
            raise BundleError(path, f"feature indices outside 1..{header.n_features}")
        if barcode.min() < 0 or barcode.max() >= header.n_barcodes:
            raise BundleError(path, f"barcode indices outside 1..{header.n_barcodes}")
        used[barcode] = True
        located = np.isfinite(coords_um[barcode, 0])
        unmatched += int((~located).sum())
        keep = located & (value > 0)
        zero += int((value == 0).sum())
        accumulator.add_points(
            coords_um[barcode[keep], 0], coords_um[barcode[keep], 1], feature[keep], value[keep]
        )
    if n_read != header.n_entries:
        raise BundleError(
            path,
            f"holds {n_read} entries but its dimensions line says {header.n_entries} (truncated?)",
        )
    matched = int((used & np.isfinite(coords_um[:, 0])).sum())
    return accumulator.result(), _EntryStats(int(used.sum()), matched, unmatched, zero)
