"""One open part in a reading process: its JPEG shard and its units as CSR arrays.

Images are served by ``histmol.shards.shard_reader.ShardReader`` (shard index parsed once, one
``os.pread`` per JPEG). The units parquet is decoded once with only the needed columns
(`decode_units`, shared between processes by `histmol.data.units_cache`); its ``gene_idx``/
``counts`` list columns are read as CSR arrays straight from the Arrow list offsets and values
(no per-row Python objects). Units store stable gene indices (`histmol.gene_reference`);
`decode_units` maps them once per part to their dense row in the corpus' genes.parquet, so a
batch's dense expression is a few slices, a lookup of rows to output columns and one scatter per
part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histmol.errors import CorpusError
from histmol.shards.shard_reader import ShardReader

UNIT_COLUMNS = ["pair_index", "gene_idx", "counts", "x_in_patch_px", "y_in_patch_px"]


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ranges ``starts[i] .. starts[i] + lengths[i] - 1`` concatenated, as one int64 array."""
    ends = np.cumsum(lengths, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    return np.arange(total, dtype=np.int64) - np.repeat(ends - lengths - starts, lengths)


def _list_csr(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list<int32> column, zero copy for a single-chunk column."""
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy()[offsets[0]:offsets[-1]]
    return (offsets - offsets[0] if offsets[0] else offsets), values


def _floats(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return np.asarray(array.to_numpy(), dtype=np.float32)


def decode_units(data: bytes, n_pairs: int, vocab: np.ndarray, where: str) -> pa.Table:
    """Read and check a part's units parquet: its `UNIT_COLUMNS`, one chunk per column.

    ``gene_idx`` comes back as dense rows of `vocab` (the corpus' sorted stable gene indices,
    i.e. genes.parquet's ``index`` column). Raises a CorpusError naming `where` when the file
    is unreadable, ``pair_index`` is not sorted within the part, ``gene_idx`` and ``counts``
    lists differ in length, or a gene index is not in genes.parquet.
    """
    try:  # one thread: in a loader worker Arrow's pool would compete with the other workers
        table = pq.read_table(pa.BufferReader(data), columns=UNIT_COLUMNS,
                              use_threads=False).combine_chunks()
    except (OSError, pa.ArrowInvalid, KeyError) as error:
        raise CorpusError(f"{where}: unreadable units parquet ({error})") from error
    pair = table.column("pair_index").to_numpy()
    if len(pair) and (np.any(np.diff(pair) < 0) or pair[0] < 0 or pair[-1] >= n_pairs):
        raise CorpusError(f"{where}: pair_index is not sorted within 0..{n_pairs - 1}")
    offsets, genes = _list_csr(table.column("gene_idx"))
    if not np.array_equal(offsets, _list_csr(table.column("counts"))[0]):
        raise CorpusError(f"{where}: gene_idx and counts lists differ in length")
    rows = np.searchsorted(vocab, genes)
    inside = rows < len(vocab)
    if not inside.all() or not np.array_equal(vocab[rows], genes):
        missing = genes[~inside] if not inside.all() else genes[vocab[rows] != genes]
        raise CorpusError(f"{where}: gene_idx {int(missing[0])} is not in genes.parquet")
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                      pa.array(rows.astype(np.int32)))
    return table.set_column(table.schema.get_field_index("gene_idx"), "gene_idx", column)


class PartUnits:
    """A part's units: per-pair unit ranges, per-unit value ranges, genes, counts, positions.

    Built from a table `decode_units` made and checked (often memory-mapped from the shared
    `histmol.data.units_cache`): the arrays are views of it, no copies. Mapping vocabulary
    indices to output columns happens per batch on the pairs read, so a worker that reads a few
    pairs of a part pays for those pairs only.
    """

    def __init__(self, table: pa.Table, n_pairs: int, lookup: np.ndarray) -> None:
        pair = table.column("pair_index").to_numpy()
        self.pair_units = np.searchsorted(pair, np.arange(n_pairs + 1)).astype(np.int64)
        self.offsets, self.genes = _list_csr(table.column("gene_idx"))
        self.counts = _list_csr(table.column("counts"))[1]
        self.lookup = lookup
        self.x, self.y = _floats(table, "x_in_patch_px"), _floats(table, "y_in_patch_px")

    def units_of(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The unit ids of `pairs` (an int64 array), concatenated in pair order; units per pair."""
        first = self.pair_units[pairs]
        n_units = self.pair_units[pairs + 1] - first
        return ragged_arange(first, n_units), n_units

    def fill_expression(self, units: np.ndarray, rows: np.ndarray, out: np.ndarray,
                        aggregate: bool) -> None:
        """Write the raw counts of `units` into rows `rows` (one per unit) of `out`.

        `out` is a zeroed float32 (R, n_genes) array. Each unit's counts go to its row; with
        `aggregate` the counts of all units given the same row are summed there (one pseudo-spot
        per pair). Genes outside the emitted set are dropped. One numpy pass for any number of
        units: a batch costs a few array operations per part, not per sample.
        """
        first = self.offsets[units]
        n_values = self.offsets[units + 1] - first
        values = ragged_arange(first, n_values)
        cols = self.lookup[self.genes[values]]
        keep = cols >= 0
        cols, counts = cols[keep], self.counts[values[keep]]
        value_rows = np.repeat(rows, n_values)[keep]
        if not aggregate:
            out[value_rows, cols] = counts
            return
        targets, local = np.unique(value_rows, return_inverse=True)
        n_genes = out.shape[1]
        sums = np.bincount(local * n_genes + cols, weights=counts,
                           minlength=len(targets) * n_genes)
        out[targets] = sums.reshape(len(targets), n_genes)

    def expression(self, pair: int, n_genes: int, aggregate: bool) -> np.ndarray:
        """One pair's dense float32 raw counts: (n_units, n_genes), or (n_genes,) summed.

        The per-sample path, kept apart from `fill_expression` because slicing one pair directly
        costs ~9 us against ~22 us through the batch machinery; tests hold the two equal.
        """
        u0, u1 = self.pair_units[pair], self.pair_units[pair + 1]
        v0, v1 = self.offsets[u0], self.offsets[u1]
        cols = self.lookup[self.genes[v0:v1]]
        keep = cols >= 0
        cols, counts = cols[keep], self.counts[v0:v1][keep]
        if aggregate:  # one pseudo-spot: the sum of the pair's units
            return np.bincount(cols, weights=counts, minlength=n_genes).astype(np.float32)
        out = np.zeros((u1 - u0, n_genes), dtype=np.float32)
        rows = np.repeat(np.arange(u1 - u0), np.diff(self.offsets[u0:u1 + 1]))[keep]
        out[rows, cols] = counts
        return out

    def unit_positions(self, pair: int) -> np.ndarray:
        """(n_units, 2) float32 unit centres inside the patch, (x, y) in patch pixels."""
        units = slice(self.pair_units[pair], self.pair_units[pair + 1])
        return np.stack([self.x[units], self.y[units]], axis=1)


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
