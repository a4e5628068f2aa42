"""BGI/STOmics Stereo-seq adapter (SAW v7 / v8): DNB expression binned on a square grid, or cells.

Matrices (SAW v7 `04.tissuecut/`, `041.cellcut/`; SAW v8 `outs/feature_expression/`; found
anywhere under the bundle, or given with `matrix=`):

- GEM (`*.gem[.gz]`, `saw convert gef2gem`): optional `#Key=value` header lines (`#FileFormat`,
  `#BinType`, `#BinSize`, `#Stereo-seqChip`, `#OffsetX`, `#OffsetY`), then tab-separated columns
  geneID, [geneName,] x, y, MIDCount (MIDCounts / UMICount in older files) [, ExonCount].
  Read in blocks with pyarrow's streaming CSV reader.
- bin GEF (`*.tissue.gef`, `*.gef`, `*.raw.gef`; HDF5): `geneExp/bin1/expression` (x, y, count)
  and `geneExp/bin1/gene` (gene, or geneID + geneName in SAW v8; offset, count): gene i owns the
  expression rows [offset, offset + count). Attributes of `expression`: minX, minY (the chip
  coordinate of stored 0), resolution (DNB pitch, nm). Read in row slices.
- cellbin GEF (`*.cellbin.gef`): `cellBin/cell` (id, x, y, offset, geneCount, ..., area),
  `cellBin/cellExp` (geneID, count; cell i owns rows [offset, offset + geneCount)),
  `cellBin/gene` (geneName, or geneID + geneName); file attributes offsetX, offsetY, resolution.

Frames. GEM and GEF store coordinates relative to an offset: chip DNB coordinate = x + OffsetX
(geftools `bgefCreater::readgem` moves the minimum into the offset; `geftogem` writes the GEF's
minX as `#OffsetX`). A GEM with no header at all (SAW before GEMv0.1, e.g. the spateo test file)
holds chip coordinates, offset 0; a header without #OffsetX/#OffsetY is refused. SAW registers
the stain image to the chip's raw matrix, so `*_regist.tif` pixel (col, row) is chip DNB (x, y)
at one pixel per DNB. The native frame here is therefore the chip's DNB grid, continuous (DNB i
spans [i, i + 1), like pixel i): with the regist.tif as WSI, native_to_wsi is the identity.
A DNB is 0.5 um (`resolution` 500 nm; the GEF value is used when present). Bins are squares of
a whole number of DNBs anchored at the matrix offset, like SAW's binN layers.

The H&E paired with a section must be colour: a single-channel image (the ssDNA or DAPI
regist.tif) is refused unless `allow_fluorescence=True`.

Format docs: SAW user manual "Expression matrix format" (GEF / GEM, https://stereotoolss-
organization.gitbook.io/saw-user-manual-v8.0/advanced/expression-matrix-format); STOmics/geftools
(`bgef_writer.cpp`, `geftogem.cpp`, `bgefCreater.cpp`); reference readers: STOmics/Stereopy
`stereo/io/gef.py`, scverse/spatialdata-io `readers/stereoseq.py`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import scipy.sparse as sp
import tifffile

from histmol.binning import BinAccumulator
from histmol.errors import BundleError, ConfigError, WSIError
from histmol.section import Section
from histmol.wsi import open_wsi
from platform_adapters._common import (
    as_int32_counts,
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    panel_section,
)
from platform_adapters._counts import check_counts

PLATFORM = "stereo-seq"
ADAPTER_VERSION = "1"
DNB_PITCH_NM = 500.0  # Stereo-seq DNB centre-to-centre distance (GEF `resolution`)
BATCH_ROWS = 1 << 21
MAX_GENES = 1 << 17  # BinAccumulator capacity: gene codes are assigned as genes first appear
BIN_PATTERNS = ("*.tissue.gef", "*.tissue.gem.gz", "*.tissue.gem", "*.gef", "*.gem.gz", "*.gem",
                "*.raw.gef")
CELL_PATTERNS = ("*.cellbin.gef",)
COUNT_COLUMNS = ("MIDCount", "MIDCounts", "UMICount")
GREY_PHOTOMETRIC = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
QC = dict[str, float | int | str | bool]


@dataclass(frozen=True)
class Matrix:
    """A GEM or bin GEF: where stored (0, 0) sits on the chip, the DNB pitch, the layout."""

    path: Path
    offset: tuple[int, int]
    pitch_nm: float
    pitch_source: str
    layout: str
    header: dict[str, str] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    n_comment: int = 0


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    bin_um: float = 25.0,
    units: Literal["bins", "cells"] = "bins",
    allow_fluorescence: bool = False,
    matrix: str | os.PathLike[str] | None = None,
) -> Section:
    """Read a SAW output folder into a Section on the chip's DNB grid.

    Args:
        bundle: the SAW output folder (or any folder holding the GEM / GEF files).
        wsi: the H&E image; the SAW `*_regist.tif` is in the native frame (opened only to check
            that it is colour).
        section_id: defaults to the slug of the bundle folder's name.
        metadata: free-form strings stored on the section.
        min_match_rate: validated for interface parity; Stereo-seq has no id join.
        native_to_wsi: explicit DNB -> WSI px affine (for an H&E that is not the regist.tif).
        bin_um: bin side in um (a whole number of DNBs) for `units="bins"`.
        units: "bins" (GEM or bin GEF binned at `bin_um`) or "cells" (cellbin GEF).
        allow_fluorescence: accept a single-channel (ssDNA / DAPI) image as the section's image.
        matrix: the GEM / GEF to read, instead of searching the bundle.

    Raises:
        BundleError: a missing, ambiguous or malformed matrix (a GEM header without offsets).
        WSIError: a single-channel image without `allow_fluorescence`, or an unreadable image.

    """
    check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    if units not in ("bins", "cells"):
        raise ConfigError(f"units must be 'bins' or 'cells', got {units!r}")
    if not float(bin_um) > 0:
        raise ConfigError(f"bin_um must be > 0, got {bin_um}")
    folder = bundle_folder(bundle)
    patterns = BIN_PATTERNS if units == "bins" else CELL_PATTERNS
    path = explicit_file(matrix, "expression matrix") if matrix else _find(folder, patterns)
    image_qc = _check_image(Path(wsi), allow_fluorescence)  # before a long matrix read
    if units == "bins":
        table, counts, ids, names, qc, pitch_um, layout = _bins(path, float(bin_um))
        geometry: tuple[Literal["square", "circle"], float, float | None] = (
            "square", float(bin_um), float(bin_um))
    else:
        table, counts, ids, names, qc, pitch_um, layout = _cells(path)
        area = table["cell_area_um2"].to_numpy(np.float64)
        geometry = ("circle", float(2.0 * np.sqrt(np.median(area) / np.pi)), None)
    panel = build_gene_panel(ids, names, counts)
    qc.update(image_qc)
    qc.update(n_control_probes=panel.n_controls, dnb_pitch_um=pitch_um)
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=table,
        panel=panel,
        files=(path,),
        layout=layout,
        metadata=metadata,
        unit_shape=geometry[0],
        unit_size_um=geometry[1],
        pitch_um=geometry[2],
        default_mode="grid",
        native_to_wsi=explicit,
        native_um_per_unit=pitch_um,
        qc=qc,
    )


def _find(folder: Path, patterns: tuple[str, ...]) -> Path:
    """Return the file matching the first pattern that matches anything under the bundle."""
    for pattern in patterns:
        found = sorted(p for p in folder.rglob(pattern) if _pattern_owns(p, pattern))
        if len(found) > 1:
            names = [str(p.relative_to(folder)) for p in found]
            raise BundleError(folder, f"several expression matrices {names}; pass matrix=")
        if found:
            return found[0]
    raise BundleError(folder, f"no expression matrix: looked for {', '.join(patterns)} in {folder}")


def _pattern_owns(path: Path, pattern: str) -> bool:
    """Match generic patterns only to files that no tissue / raw / cellbin pattern claims."""
    if not path.is_file():
        return False
    if pattern.startswith("*.tissue") or pattern.startswith("*.raw") or "cellbin" in pattern:
        return True
    return not any(tag in path.name for tag in (".tissue.", ".raw.", ".cellbin."))


# -- bins ------------------------------------------------------------------------------------

Batch = tuple[np.ndarray, list[str], list[str], np.ndarray, np.ndarray, np.ndarray]
"""Local gene code per row, gene id and name per local code, stored x, y (DNB) and MID counts."""
Parts = tuple[pd.DataFrame, sp.csr_matrix, list[str], list[str], QC, float, str]


def _bins(path: Path, bin_um: float) -> Parts:
    """DNB counts summed into squares of `bin_um`, anchored at the matrix offset."""
    source = _open_matrix(path)
    pitch_um = source.pitch_nm / 1000.0
    factor = bin_um / pitch_um
    if abs(factor - round(factor)) > 1e-6 or round(factor) < 1:
        raise ConfigError(f"bin_um {bin_um:g} is not a whole number of {pitch_um:g} um DNBs")
    factor = round(factor)
    # Binning runs in DNB units on the stored integer coordinates, so bin edges are exact.
    accumulator = BinAccumulator(MAX_GENES, float(factor))
    index: dict[str, int] = {}
    symbols: dict[str, str] = {}
    n_rows = n_mid = 0
    batches = _gef_batches(source) if _is_hdf5(path) else _gem_batches(source)
    for local, ids, names, x, y, counts in batches:
        lookup = np.full(len(ids), -1, dtype=np.int64)
        for code in np.unique(local):  # genes seen in this batch get a code on first sight
            lookup[code] = index.setdefault(ids[code], len(index))
            symbols.setdefault(ids[code], names[code])
        if len(index) > MAX_GENES:
            raise BundleError(path, f"holds more than {MAX_GENES} genes")
        if len(counts) and counts.min() < 0:
            raise BundleError(path, "MID counts hold negative values")
        accumulator.add_points(x, y, lookup[local], counts)
        n_rows, n_mid = n_rows + len(counts), n_mid + int(counts.sum())
    if not index:
        raise BundleError(path, "holds no expression rows")
    binned = accumulator.result()
    gene_ids = sorted(index)
    counts = sp.csr_matrix(binned.counts[:, [index[g] for g in gene_ids]])
    x_dnb, y_dnb = binned.centres_um()
    units = pd.DataFrame({
        "unit_id": [f"bin{factor}_{c}_{r}" for c, r in zip(binned.col, binned.row, strict=True)],
        "x_native": x_dnb + source.offset[0], "y_native": y_dnb + source.offset[1],
        "bin_col": binned.col.astype(np.int32), "bin_row": binned.row.astype(np.int32),
    })
    qc: QC = {
        "units": "bins", "bin_um": bin_um, "bin_dnb": factor, "matrix_source": path.name,
        "matrix_layout": source.layout, "offset_x": source.offset[0],
        "offset_y": source.offset[1], "dnb_pitch_source": source.pitch_source,
        "n_matrix_rows": n_rows, "n_mid_total": n_mid, "n_bins": len(units),
    }
    names = [symbols[g] for g in gene_ids]
    return units, counts, gene_ids, names, qc, pitch_um, source.layout


def _is_hdf5(path: Path) -> bool:
    return path.suffix == ".gef" or h5py.is_hdf5(path)


def _open_matrix(path: Path) -> Matrix:
    """Offset, DNB pitch and layout of a GEM or bin GEF, from its header / attributes."""
    if _is_hdf5(path):
        try:
            with h5py.File(path, "r") as handle:
                if "geneExp/bin1/expression" not in handle:
                    raise BundleError(path, f"not a bin GEF: no geneExp/bin1; found {list(handle)}")
                attrs = dict(handle["geneExp/bin1/expression"].attrs)
                version = int(np.ravel(handle.attrs.get("version", [0]))[0])
        except OSError as err:
            raise BundleError(path, f"cannot open as HDF5 (truncated or corrupt?): {err}") from err
        if "minX" not in attrs or "minY" not in attrs:
            raise BundleError(path, "geneExp/bin1/expression lacks its minX / minY offsets")
        offset = (int(np.ravel(attrs["minX"])[0]), int(np.ravel(attrs["minY"])[0]))
        pitch, source = _pitch(attrs.get("resolution"))
        return Matrix(path, offset, pitch, source, f"gef-v{version}", {}, [])
    header, n_comment, columns = _gem_header(path)
    if header:
        missing = [k for k in ("OffsetX", "OffsetY") if k not in header]
        if missing:
            raise BundleError(
                path, f"GEM header lacks {['#' + k for k in missing]} (found {sorted(header)}): "
                "the chip offset of its x, y is unknown")
        try:
            offset = (int(header["OffsetX"]), int(header["OffsetY"]))
        except ValueError as err:
            raise BundleError(path, f"GEM offsets are not integers: {err}") from err
        layout = f"gem-{header.get('FileFormat', 'unknown')}"
    else:
        offset, layout = (0, 0), "gem-no-header"  # before GEMv0.1: chip coordinates
    pitch, source = _pitch(None)
    return Matrix(path, offset, pitch, source, layout, header, columns, n_comment)


def _pitch(resolution: object) -> tuple[float, str]:
    if resolution is not None and float(np.ravel(resolution)[0]) > 0:
        return float(np.ravel(resolution)[0]), "gef_resolution"
    return DNB_PITCH_NM, "default_500nm"


def _gem_header(path: Path) -> tuple[dict[str, str], int, list[str]]:
    """`#Key=value` lines, how many there are, and the column names that follow."""
    header: dict[str, str] = {}
    n_comment = 0
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                if not line.startswith("#"):
                    return header, n_comment, line.rstrip("\r\n").split("\t")
                key, _, value = line[1:].strip().partition("=")
                header[key.strip()] = value.strip()
                n_comment += 1
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BundleError(path, f"cannot read as a GEM text file: {err}") from err
    raise BundleError(path, "GEM has no column header line (empty or truncated file)")


def _gem_batches(source: Matrix) -> Iterator[Batch]:
    """GEM rows in blocks, gene columns dictionary-encoded."""
    path, columns = source.path, source.columns
    count = next((c for c in COUNT_COLUMNS if c in columns), None)
    missing = [c for c in ("geneID", "x", "y") if c not in columns]
    missing += [] if count else ["MIDCount"]
    if missing:
        raise BundleError(path, f"GEM lacks columns {missing}; found columns {columns}")
    assert count is not None
    text = pa.dictionary(pa.int32(), pa.string())
    # counts as float64: an int64 column would fail on "2.5" without saying where; check_counts
    # names the line
    types = {"geneID": text, "geneName": text, "x": pa.int64(), "y": pa.int64(),
             count: pa.float64()}
    wanted = [c for c in ("geneID", "geneName", "x", "y", count) if c in columns]
    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(skip_rows=source.n_comment, block_size=1 << 24),
            parse_options=pcsv.ParseOptions(delimiter="\t"),
            convert_options=pcsv.ConvertOptions(
                include_columns=wanted, column_types={c: types[c] for c in wanted}),
        )
        first_line = source.n_comment + 2  # comment lines, the column header, then 1-based
        for batch in reader:
            values = check_counts(
                batch.column(count).to_numpy(zero_copy_only=False), path,
                lambda i, at=first_line: f"line {at + i} ({count})")
            first_line += batch.num_rows
            genes = batch.column("geneID")
            local = genes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            ids = [str(v) for v in genes.dictionary.to_pylist()]
            names = ids
            if "geneName" in wanted:
                first = np.zeros(len(ids), dtype=np.int64)
                first[local[::-1]] = np.arange(len(local))[::-1]
                symbols = batch.column("geneName")
                named = symbols.dictionary.to_numpy(zero_copy_only=False)
                names = [str(v) for v in named[symbols.indices.to_numpy()[first]]]
            yield (local, ids, names, batch.column("x").to_numpy().astype(np.float64),
                   batch.column("y").to_numpy().astype(np.float64),
                   values)
    except (OSError, EOFError, pa.ArrowException) as err:
        raise BundleError(path, f"cannot read the GEM (truncated or corrupt?): {err}") from err


def _gef_batches(source: Matrix) -> Iterator[Batch]:
    """Expression rows of geneExp/bin1 in slices; a row's gene comes from the gene offsets."""
    path = source.path
    try:
        with h5py.File(path, "r") as handle:
            group = handle["geneExp/bin1"]
            genes = group["gene"][()]
            ids, names = _gene_fields(genes, path, "geneExp/bin1/gene")
            expression = group["expression"]
            starts = genes["offset"].astype(np.int64)
            order = np.argsort(starts, kind="stable")
            spans = genes["count"].astype(np.int64)[order]
            ends = np.cumsum(spans)
            if len(order) and (starts[order][0] != 0 or (starts[order][1:] != ends[:-1]).any()
                               or ends[-1] != expression.shape[0]):
                raise BundleError(path, "gene offsets / counts do not tile the expression rows")
            for start in range(0, expression.shape[0], BATCH_ROWS):
                block = expression[start : start + BATCH_ROWS]
                rows = np.arange(start, start + len(block))
                local = order[np.searchsorted(ends, rows, side="right")]
                counts = check_counts(block["count"], path, lambda i, at=start: (
                    f"geneExp/bin1/expression row {at + i} (count)"))
                yield (local, ids, names, block["x"].astype(np.float64),
                       block["y"].astype(np.float64), counts)
    except (OSError, KeyError, ValueError) as err:
        raise BundleError(path, f"cannot read the bin GEF (truncated or corrupt?): {err}") from err


def _gene_fields(table: np.ndarray, path: Path, where: str) -> tuple[list[str], list[str]]:
    """Gene ids and names: SAW v8 geneID + geneName, older files one `gene` / `geneName` field."""
    fields = table.dtype.names or ()
    def text(field: str) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in table[field]]
    if "geneID" in fields:
        ids = text("geneID")
        return ids, text("geneName") if "geneName" in fields else ids
    for name in ("gene", "geneName"):
        if name in fields:
            ids = text(name)
            return ids, ids
    raise BundleError(path, f"{where} has no gene field; found fields {list(fields)}")


# -- cells -----------------------------------------------------------------------------------


def _cells(path: Path) -> Parts:
    """Cells of a cellbin GEF at their centroids, with their expression."""
    try:
        with h5py.File(path, "r") as handle:
            if "cellBin" not in handle:
                raise BundleError(path, f"not a cellbin GEF: no cellBin; found {list(handle)}")
            cells = handle["cellBin/cell"][()]
            expression = handle["cellBin/cellExp"][()]
            ids, names = _gene_fields(handle["cellBin/gene"][()], path, "cellBin/gene")
            attrs = dict(handle.attrs)
    except (OSError, KeyError, ValueError) as err:
        raise BundleError(path, f"cannot read cellbin GEF (truncated or corrupt?): {err}") from err
    if "offsetX" not in attrs or "offsetY" not in attrs:
        raise BundleError(path, "cellbin GEF lacks its offsetX / offsetY attributes")
    offset = (int(np.ravel(attrs["offsetX"])[0]), int(np.ravel(attrs["offsetY"])[0]))
    pitch_nm, pitch_source = _pitch(attrs.get("resolution"))
    spans = cells["geneCount"].astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(spans)])
    rows = np.repeat(cells["offset"].astype(np.int64) - indptr[:-1], spans) + np.arange(indptr[-1])
    if len(rows) and (rows.max() >= len(expression) or rows.min() < 0):
        raise BundleError(path, "cellBin/cell offsets point past cellBin/cellExp")
    genes = expression["geneID"].astype(np.int64)[rows]
    if len(genes) and genes.max() >= len(ids):
        raise BundleError(path, "cellBin/cellExp gene ids exceed cellBin/gene")
    values = check_counts(expression["count"], path, lambda i: f"cellBin/cellExp row {i} (count)")
    matrix = sp.csr_matrix((values[rows], genes, indptr), shape=(len(cells), len(ids)))
    pitch_um = pitch_nm / 1000.0
    units = pd.DataFrame({
        "unit_id": [f"cell{int(v)}" for v in cells["id"]],
        "x_native": cells["x"].astype(np.float64) + offset[0] + 0.5,
        "y_native": cells["y"].astype(np.float64) + offset[1] + 0.5,
        "cell_area_um2": cells["area"].astype(np.float64) * pitch_um**2,
    })
    qc: QC = {"units": "cells", "matrix_source": path.name, "offset_x": offset[0],
              "offset_y": offset[1], "dnb_pitch_source": pitch_source, "n_cells": len(units)}
    return units, as_int32_counts(matrix, path), ids, names, qc, pitch_um, "cellbin-gef"


# -- image -----------------------------------------------------------------------------------


def _check_image(path: Path, allow_fluorescence: bool) -> QC:
    """Refuse a single-channel (ssDNA / DAPI) image as the section's H&E unless allowed."""
    if allow_fluorescence:
        return {"image_channels": "not checked (allow_fluorescence)"}
    advice = ("a single-channel image is a fluorescence stain (ssDNA or DAPI regist.tif), not "
              "H&E: pair the section with its H&E image, or pass allow_fluorescence=True")
    try:
        with open_wsi(path):
            pass
    except WSIError as err:
        if any(k in err.problem for k in ("single-channel", "single RGB plane", "not an RGB")):
            raise WSIError(path, f"{err.problem}; {advice}") from err
        raise
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].keyframe
            if page.photometric in GREY_PHOTOMETRIC or page.samplesperpixel == 1:
                raise WSIError(path, f"stored as {page.photometric.name} with "
                                     f"{page.samplesperpixel} sample(s) per pixel; {advice}")
    return {"image_channels": "rgb"}
