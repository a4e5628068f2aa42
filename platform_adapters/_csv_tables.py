"""Streaming readers for the large CSV tables of CosMx, MERSCOPE and Slide-seq bundles.

- `read_dense_counts`: a dense count table (CosMx exprMat, MERSCOPE cell_by_gene, Slide-seq
  DGE) parsed in blocks and kept as CSR, so a whole-transcriptome table never sits in memory
  dense.
- `bin_transcripts`: a transcript list (CosMx `*_tx_file.csv`, MERSCOPE
  `detected_transcripts.csv`) spilled by bands of bin rows in one pass (blocks parsed by
  pyarrow, `histmol.binning.BandedBinner`), then summed band by band onto disk by
  `binned_units`: memory bounded by one band. One pass because the target panel is not known
  before the file is read (a transcripts-only bundle has no matrix header to take it from) and a
  second pass over a multi-GB CSV only to list names doubles the cost: targets get indices in
  order of first appearance inside a fixed-width index space (`MAX_TARGETS`), and the unused
  columns are cut off at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import scipy.sparse as sp

from histmol.binning import BandedBinner
from histmol.errors import BundleError
from platform_adapters._banded import banded_units
from platform_adapters._common import (
    GenePanel,
    StreamedPanel,
    as_int32_counts,
    first_line,
)

MAX_TARGETS = 1 << 16  # whole-transcriptome panels hold ~19k targets plus controls
BLOCK_BYTES = 32 << 20  # CSV bytes parsed per block
DENSE_BLOCK_BYTES = 8 << 20  # CSV bytes per block of a dense table (~4M values)


def header_fields(path: Path) -> tuple[list[str], str]:
    """Return the header's fields (quotes stripped) and the separator (tab or comma)."""
    line = first_line(path)
    sep = "\t" if line.count("\t") > line.count(",") else ","
    return [h.strip().strip('"') for h in line.split(sep)], sep


def read_dense_counts(
    path: Path, n_id_columns: int, what: str
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """Read a dense count table in blocks: row ids (n, n_id_columns) str, value names, CSR.

    The first `n_id_columns` columns label each row; every other column must hold raw counts.
    Blocks are parsed by pyarrow (several times faster than pandas on wide tables) and turned
    into int32 CSR one at a time. Raises BundleError naming `path` for ragged rows, missing,
    non-numeric or non-integer values.
    """
    header, sep = header_fields(path)
    names = np.array(header[n_id_columns:], dtype=object)
    if names.size == 0:
        raise BundleError(path, f"{what} has no value columns (header {header})")
    columns = [f"c{i}" for i in range(len(header))]  # the header may repeat or omit names
    read_options = pacsv.ReadOptions(
        column_names=columns, skip_rows=1, block_size=DENSE_BLOCK_BYTES
    )
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns[:n_id_columns]}, strings_can_be_null=False
    )
    ids: list[np.ndarray] = []
    blocks: list[sp.csr_matrix] = []
    try:
        reader = pacsv.open_csv(
            path,
            read_options=read_options,
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=convert,
        )
        for batch in reader:
            values = batch.columns[n_id_columns:]
            bad = [
                header[n_id_columns + i]
                for i, v in enumerate(values)
                if not (pa.types.is_integer(v.type) or pa.types.is_floating(v.type)) or v.null_count
            ]
            if bad:
                raise BundleError(
                    path, f"{what} columns {bad[:5]} hold missing or non-numeric values"
                )
            nonzero = [_nonzero(v.to_numpy(zero_copy_only=False)) for v in values]
            block = sp.coo_matrix(
                (
                    np.concatenate([v for _, v in nonzero]),
                    (
                        np.concatenate([r for r, _ in nonzero]),
                        np.repeat(np.arange(len(values)), [len(r) for r, _ in nonzero]),
                    ),
                ),
                shape=(batch.num_rows, len(values)),
            )
            labels = [c.to_numpy(zero_copy_only=False) for c in batch.columns[:n_id_columns]]
            ids.append(np.column_stack(labels).astype(str).astype(object))
            first = sum(b.shape[0] for b in blocks)
            blocks.append(as_int32_counts(block, path, first_row=first, row_names=ids[-1][:, 0],
                                          col_names=names))
    except (pa.ArrowInvalid, OSError) as err:
        raise BundleError(path, f"cannot read {what}: {err}") from err
    if not blocks:
        raise BundleError(path, f"{what} holds no rows")
    return np.concatenate(ids), names, sp.csr_matrix(sp.vstack(blocks, format="csr"))


def _nonzero(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(column)
    return rows, column[rows].astype(np.float64)


@dataclass(frozen=True)
class BinnedTranscripts:
    """Transcripts spilled by band (summed when read), and the targets in column order."""

    binner: BandedBinner
    names: np.ndarray
    bin_um: float
    n_points: int


def bin_transcripts(
    path: Path,
    *,
    x: str,
    y: str,
    gene: str,
    bin_um: float,
    scale_xy: tuple[float, float] = (1.0, 1.0),
) -> BinnedTranscripts:
    """Sum the transcripts of CSV `path` into `bin_um` squares of the frame (x * sx, y * sy) um.

    `scale_xy` turns the file's coordinates into micrometres of the native frame (a negative
    factor flips that axis). Raises BundleError naming `path` for missing columns, unreadable
    blocks or non-finite coordinates.
    """
    options = pacsv.ConvertOptions(
        include_columns=[x, y, gene],
        column_types={x: pa.float64(), y: pa.float64(), gene: pa.string()},
    )
    binner = BandedBinner(MAX_TARGETS, bin_um)
    index: dict[str, int] = {}
    n_points = 0
    try:
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES), convert_options=options
        )
        for batch in reader:
            xs = batch.column(x).to_numpy(zero_copy_only=False) * scale_xy[0]
            ys = batch.column(y).to_numpy(zero_copy_only=False) * scale_xy[1]
            if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
                raise BundleError(path, f"{x} / {y} hold missing or non-finite values")
            codes = _codes(batch.column(gene), index, path)
            try:
                binner.add_points(xs, ys, codes)
            except ValueError as err:  # coordinates not in um (e.g. pixels), far off the origin
                raise BundleError(path, f"{x} / {y}: {err}") from err
            n_points += batch.num_rows
    except (pa.ArrowInvalid, OSError) as err:
        binner.close()
        raise BundleError(
            path, f"cannot read as a transcripts CSV with columns {x}, {y}, {gene}: {err}"
        ) from err
    except BaseException:
        binner.close()
        raise
    if not index:
        raise BundleError(path, "holds no transcripts")
    names = np.array(list(index), dtype=object)
    return BinnedTranscripts(binner, names, float(bin_um), n_points)


def _codes(column: pa.ChunkedArray | pa.Array, index: dict[str, int], path: Path) -> np.ndarray:
    """Global target indices of one block, registering names seen for the first time."""
    encoded = pc.dictionary_encode(column)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    out = []
    for chunk in chunks:
        if chunk.null_count:
            raise BundleError(path, "the target column holds empty values")
        lookup = np.empty(len(chunk.dictionary), dtype=np.int64)
        for i, name in enumerate(chunk.dictionary.to_pylist()):
            code = index.setdefault(name, len(index))
            if code >= MAX_TARGETS:
                raise BundleError(path, f"more than {MAX_TARGETS} distinct targets")
            lookup[i] = code
        out.append(lookup[chunk.indices.to_numpy(zero_copy_only=False)])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def binned_units(binned: BinnedTranscripts, bin_um: float) -> tuple[pd.DataFrame, GenePanel, int]:
    """Units table, gene panel (controls split out) and the number of control-only bins dropped.

    A bin holding only control probes carries no expression: it is dropped and counted, as the
    Xenium adapter does.
    """
    panel = StreamedPanel.of(binned.names, binned.names)
    units, gene_panel, n_controls_only, _ = banded_units(binned.binner, panel, bin_um)
    return units, gene_panel, n_controls_only
