"""One open part in a reading process: its JPEG shard and its units as CSR arrays.

Images are served by ``histmol.shards.shard_reader.ShardReader`` (shard index parsed once, one
``os.pread`` per JPEG). The units parquet is read once with only the needed columns; its
``gene_idx``/``counts`` list columns become CSR arrays straight from the Arrow list offsets and
values (no per-row Python objects); a sample's dense expression is a slice, a lookup of its
vocabulary indices to output columns and one scatter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histmol.errors import CorpusError
from histmol.shards.shard_reader import ShardReader

UNIT_COLUMNS = ["pair_index", "gene_idx", "counts", "x_in_patch_px", "y_in_patch_px"]


def _list_csr(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list<int32> column, zero copy where Arrow allows."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy()[offsets[0]:offsets[-1]]
    return offsets - offsets[0], values


class PartUnits:
    """A part's units: per-pair unit ranges, per-unit value ranges, genes, counts, positions.

    Only the parquet decode happens per part (~10 ms for 1M values); mapping vocabulary indices
    to output columns happens per sample on its own slice, so a worker that reads a few pairs of
    a part pays for those pairs only.
    """

    def __init__(self, data: bytes, n_pairs: int, lookup: np.ndarray, where: str) -> None:
        try:
            table = pq.read_table(pa.BufferReader(data), columns=UNIT_COLUMNS)
        except (OSError, pa.ArrowInvalid, KeyError) as error:
            raise CorpusError(f"{where}: unreadable units parquet ({error})") from error
        pair = table.column("pair_index").to_numpy()
        if len(pair) and (np.any(np.diff(pair) < 0) or pair[0] < 0 or pair[-1] >= n_pairs):
            raise CorpusError(f"{where}: pair_index is not sorted within 0..{n_pairs - 1}")
        self.pair_units = np.searchsorted(pair, np.arange(n_pairs + 1)).astype(np.int64)
        self.offsets, self.genes = _list_csr(table.column("gene_idx"))
        count_offsets, self.counts = _list_csr(table.column("counts"))
        if not np.array_equal(self.offsets, count_offsets):
            raise CorpusError(f"{where}: gene_idx and counts lists differ in length")
        if len(self.genes) and (self.genes.min() < 0 or self.genes.max() >= len(lookup)):
            raise CorpusError(f"{where}: gene_idx outside the vocabulary 0..{len(lookup) - 1}")
        self.lookup = lookup
        self.positions = np.stack([
            table.column("x_in_patch_px").to_numpy().astype(np.float32),
            table.column("y_in_patch_px").to_numpy().astype(np.float32),
        ], axis=1) if len(pair) else np.zeros((0, 2), dtype=np.float32)

    def expression(self, pair: int, n_genes: int, aggregate: bool) -> np.ndarray:
        """Dense float32 raw counts: (n_units, n_genes), or (n_genes,) summed over units."""
        u0, u1 = self.pair_units[pair], self.pair_units[pair + 1]
        v0, v1 = self.offsets[u0], self.offsets[u1]
        cols = self.lookup[self.genes[v0:v1]]
        keep = cols >= 0
        cols, counts = cols[keep], self.counts[v0:v1][keep]
        if aggregate:  # one pseudo-spot: the sum of the pair's units
            return np.bincount(cols, weights=counts, minlength=n_genes).astype(np.float32)
        out = np.zeros((u1 - u0, n_genes), dtype=np.float32)
        if u1 - u0 == 1:
            out[0, cols] = counts
        else:
            rows = np.repeat(np.arange(u1 - u0), np.diff(self.offsets[u0:u1 + 1]))[keep]
            out[rows, cols] = counts
        return out

    def unit_positions(self, pair: int) -> np.ndarray:
        """(n_units, 2) float32 unit centres inside the patch, (x, y) in patch pixels."""
        return self.positions[self.pair_units[pair]:self.pair_units[pair + 1]]


class OpenPart:
    """A part's shard reader and units, opened in the process that reads them."""

    def __init__(self, images_dir: Path, units: PartUnits, n_pairs: int, where: str) -> None:
        self.reader = ShardReader(images_dir)
        if self.reader.n_pairs != n_pairs:
            self.reader.close()
            raise CorpusError(f"{where}: shard holds {self.reader.n_pairs} patches, the manifest "
                              f"says {n_pairs}")
        self.units = units

    def close(self) -> None:
        """Close the shard file."""
        self.reader.close()
