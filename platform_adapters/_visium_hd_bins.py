"""Visium HD bin matrices streamed in barcode chunks and summed into coarser square bins.

Why: a 2 um `filtered_feature_bc_matrix.h5` holds ~11 M barcodes; it is read in chunks
(`_tenx.TenxH5Chunks`), joined onto the positions grid by parsing barcodes (no string join),
and summed into coarser bins one band of coarse array rows at a time with
`histmol.binning.BinAccumulator`, closing each band as soon as its last chunk has been read.
Each closed band goes through the gene panel (controls split, duplicates merged) and onto disk
(`histmol.counts_store.CountsStore`), so memory follows the open bands and the per-unit index,
neither the 2 um input nor the coarse output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.binning import BinAccumulator
from histmol.counts_store import CountsStore
from histmol.errors import BundleError
from platform_adapters._common import GenePanel, StreamedPanel
from platform_adapters._tenx import GENE_EXPRESSION, TenxH5Chunks
from platform_adapters._visium_hd_positions import (
    ABSENT,
    IN_MATRIX,
    IN_TISSUE,
    OUT_OF_TISSUE,
    PositionGrid,
    parse_barcodes,
)

MATRIX_CHUNK = 1 << 18  # barcodes per chunk: ~5 MB of barcodes, a few MB of counts


@dataclass(frozen=True)
class BinnedMatrix:
    """Bins of the requested size (sorted by array row, then column) and their gene panel."""

    row: np.ndarray
    col: np.ndarray
    n_source_bins: np.ndarray
    panel: GenePanel  # counts: a CountsStore, rows aligned with (row, col)
    feature_ids: np.ndarray
    feature_names: np.ndarray
    n_features: int
    n_barcodes: int
    n_matched: int
    n_not_in_tissue: int


def _locate(grid: PositionGrid, barcodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absolute (row, col) of each barcode and whether it is a listed bin of the grid."""
    row, col, ok = parse_barcodes(barcodes, grid.bin_um)
    r, c = row - grid.row0, col - grid.col0
    ok &= (r >= 0) & (c >= 0) & (r < grid.state.shape[0]) & (c < grid.state.shape[1])
    ok[ok] = (grid.state[r[ok], c[ok]] & (IN_TISSUE | OUT_OF_TISSUE)) != ABSENT
    return row, col, ok


def bin_matrix(
    path: Path,
    grid: PositionGrid,
    *,
    factor: int,
    min_match_rate: float,
    chunk: int = MATRIX_CHUNK,
) -> BinnedMatrix:
    """Join the matrix onto the grid and sum its bins into bins `factor` times coarser.

    A first pass over the barcodes joins them (match rate, duplicates) and notes the last chunk
    holding each band of coarse rows; the second pass reads counts chunk by chunk and closes each
    band when its last chunk is in, so only open bands are held.
    """
    with TenxH5Chunks(path) as matrix:
        gex = np.flatnonzero(matrix.feature_types == GENE_EXPRESSION)
        if len(gex) == 0:
            raise BundleError(path, "holds no 'Gene Expression' features")
        ranges = matrix.ranges(chunk)
        band0 = grid.row0 // factor
        last = np.full((grid.row0 + grid.state.shape[0] - 1) // factor - band0 + 1, -1)
        n_matched = n_outside = 0
        for i, (start, stop) in enumerate(ranges):
            row, col, ok = _locate(grid, matrix.barcodes(start, stop))
            r, c = row[ok] - grid.row0, col[ok] - grid.col0
            flat = r * grid.state.shape[1] + c
            if (grid.state[r, c] & IN_MATRIX).any() or len(np.unique(flat)) < len(flat):
                raise BundleError(path, "a barcode is listed twice")
            grid.state[r, c] |= IN_MATRIX
            n_matched += int(ok.sum())
            n_outside += int(((grid.state[r, c] & IN_TISSUE) == 0).sum())
            last[np.unique(row[ok] // factor - band0)] = i
        if matrix.n_barcodes == 0:
            raise BundleError(path, "holds no barcodes")
        rate = n_matched / matrix.n_barcodes
        if rate < min_match_rate:
            raise BundleError(
                path,
                (
                    f"only {n_matched} of {matrix.n_barcodes} barcodes ({rate:.2%}) have a "
                    f"position in {grid.path}; min_match_rate is {min_match_rate:.2%}"
                ),
            )
        row, col, n_source = _units(grid, factor)
        panel = StreamedPanel.of(matrix.feature_ids[gex], matrix.feature_names[gex])
        sink = _CountsSink(row, col, panel)
        _sum_chunks(matrix, grid, ranges, gex, factor, last, band0, sink)
        return BinnedMatrix(row, col, n_source, sink.result(), matrix.feature_ids[gex],
                            matrix.feature_names[gex], matrix.n_features, matrix.n_barcodes,
                            n_matched, n_outside)


def _sum_chunks(
    matrix: TenxH5Chunks, grid: PositionGrid, ranges: list[tuple[int, int]], gex: np.ndarray,
    factor: int, last: np.ndarray, band0: int, sink: _CountsSink,
) -> None:
    """Sum counts into coarse bins chunk by chunk; each band reaches the sink exactly once.

    Rows of bands that close in this chunk and were never opened go to one fresh accumulator;
    the others go to their band's open accumulator, emitted when the band's last chunk is in.
    """
    open_bands: dict[int, BinAccumulator] = {}

    def accumulator() -> BinAccumulator:
        return BinAccumulator(len(gex), float(grid.bin_um * factor))

    def emit(acc: BinAccumulator) -> None:
        result = acc.result()
        sink.add(result.row, result.col, result.counts)

    all_genes = len(gex) == matrix.n_features
    for i, (start, stop) in enumerate(ranges):
        row, col, ok = _locate(grid, matrix.barcodes(start, stop))
        counts = matrix.counts(start, stop)[np.flatnonzero(ok)]
        counts = counts if all_genes else sp.csr_matrix(counts[:, gex])
        row, col = row[ok], col[ok]
        if factor == 1:
            order = np.lexsort((col, row))
            sink.add(row[order], col[order], sp.csr_matrix(counts[order]))
            continue
        band = row // factor - band0
        held = np.isin(band, np.fromiter(open_bands, np.int64, len(open_bands)))
        fresh = (last[band] == i) & ~held
        rest = np.flatnonzero(~fresh)
        rest = rest[np.argsort(band[rest], kind="stable")]
        bands, starts = np.unique(band[rest], return_index=True)
        groups = np.split(rest, starts[1:]) if len(rest) else []
        for b, sel in zip(bands.tolist(), groups, strict=True):
            held_band = open_bands.setdefault(b, accumulator())
            held_band.add_bins(col[sel], row[sel], counts[sel], factor)
        for b in sorted(b for b in open_bands if last[b] == i):
            emit(open_bands.pop(b))
        if fresh.any():
            acc = accumulator()
            sel = np.flatnonzero(fresh)
            acc.add_bins(col[sel], row[sel], counts[sel], factor)
            emit(acc)


def _units(grid: PositionGrid, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse bins holding at least one matrix bin: absolute (row, col) and how many, row-major."""
    matched = (grid.state & IN_MATRIX) > 0
    pad_r, pad_c = grid.row0 % factor, grid.col0 % factor
    height = -(-(matched.shape[0] + pad_r) // factor) * factor
    width = -(-(matched.shape[1] + pad_c) // factor) * factor
    padded = np.zeros((height, width), np.uint8)
    padded[pad_r : pad_r + matched.shape[0], pad_c : pad_c + matched.shape[1]] = matched
    n_source = padded.reshape(height // factor, factor, width // factor, factor).sum(
        axis=(1, 3), dtype=np.int32)
    rows, cols = np.nonzero(n_source)
    return rows + grid.row0 // factor, cols + grid.col0 // factor, n_source[rows, cols]


class _CountsSink:
    """Sends summed pieces through the gene panel onto disk, in whatever unit order they come."""

    def __init__(self, row: np.ndarray, col: np.ndarray, panel: StreamedPanel) -> None:
        self.row0, self.col0 = (int(row.min()), int(col.min())) if len(row) else (0, 0)
        shape = (int(row.max(initial=0)) - self.row0 + 1, int(col.max(initial=0)) - self.col0 + 1)
        self.index = np.full(shape, -1, np.int64)
        self.index[row - self.row0, col - self.col0] = np.arange(len(row))
        self.panel = panel
        self.store = CountsStore(len(row), len(panel.genes))
        self.controls = np.zeros((len(row), len(panel.control_names)), np.int64)

    def add(self, row: np.ndarray, col: np.ndarray, counts: sp.csr_matrix) -> None:
        """Take the summed counts of coarse bins (row, col)."""
        unit = self.index[row - self.row0, col - self.col0]
        genes, controls = self.panel.apply(counts)
        self.store.write_rows(unit, genes)
        self.controls[unit] = controls

    def result(self) -> GenePanel:
        """The panel over all units (units no piece reached get empty rows)."""
        missing = np.flatnonzero(self.store.row_lengths() < 0)
        self.store.write_rows(missing, sp.csr_matrix((len(missing), self.store.shape[1]),
                                                     dtype=np.int32))
        controls = pd.DataFrame(dict(zip(self.panel.control_names, self.controls.T, strict=True)))
        return GenePanel(self.panel.genes, self.store.finish(), controls, self.panel.n_controls)
