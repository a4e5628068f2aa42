"""Square binning of points (transcripts) and of fine bins (Visium HD 2 um) into coarser bins.

Streaming: callers feed chunks (a row group of a transcripts parquet, a slice of a 2 um
matrix) to a `BinAccumulator`, whose memory follows the number of non-empty (bin, gene)
pairs, not the number of input points; or, for points in no spatial order (a whole Xenium
section's transcripts), to a `BandedBinner`, whose memory follows one band of bin rows. Bins are
half-open squares `[origin + k*bin, origin + (k+1)*bin)`, so a point on a border belongs to
exactly one bin.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import scipy.sparse as sp

_INDEX_BITS = 21  # bin row/col each within +-2^20 bins: 2 m of tissue at 1 um bins
_INDEX_OFFSET = 1 << (_INDEX_BITS - 1)
_COMPACT_FACTOR = 2  # compact partial sums once they exceed 2x the last compacted size


@dataclass(frozen=True)
class BinnedCounts:
    """Non-empty bins, sorted by (row, col), with their summed counts."""

    col: np.ndarray
    row: np.ndarray
    counts: sp.csr_matrix
    bin_um: float
    origin_um: tuple[float, float]

    @property
    def n_bins(self) -> int:
        """Number of non-empty bins."""
        return len(self.col)

    def centres_um(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin centres in the input frame's micrometres."""
        x = self.origin_um[0] + (self.col + 0.5) * self.bin_um
        y = self.origin_um[1] + (self.row + 0.5) * self.bin_um
        return x, y


def bin_of(
    x_um: np.ndarray, y_um: np.ndarray, bin_um: float, origin_um: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """(col, row) of the bin holding each point."""
    col = np.floor((np.asarray(x_um, dtype=np.float64) - origin_um[0]) / bin_um).astype(np.int64)
    row = np.floor((np.asarray(y_um, dtype=np.float64) - origin_um[1]) / bin_um).astype(np.int64)
    return col, row


class BinAccumulator:
    """Sum counts per (bin, gene) over chunks of points or of finer bins."""

    def __init__(
        self, n_genes: int, bin_um: float, origin_um: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        self.n_genes, self.bin_um, self.origin_um = _grid(n_genes, bin_um, origin_um)
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._pending = 0
        self._compacted = 0

    def add_points(
        self, x_um: np.ndarray, y_um: np.ndarray, gene: np.ndarray, counts: np.ndarray | None = None
    ) -> None:
        """Add points (one molecule each unless `counts` says how many) in micrometres."""
        col, row = bin_of(x_um, y_um, self.bin_um, self.origin_um)
        values = (
            np.ones(len(col), dtype=np.int64) if counts is None else np.asarray(counts, np.int64)
        )
        self._add(col, row, np.asarray(gene, dtype=np.int64), values)

    def add_bins(self, col: np.ndarray, row: np.ndarray, counts: sp.spmatrix, factor: int) -> None:
        """Add fine bins given by integer (col, row) on a grid `factor` times finer than ours.

        The fine grid must share our origin; fine bin (c, r) falls in coarse bin (c//f, r//f).
        """
        coo = sp.coo_matrix(counts)
        fine_col = np.asarray(col, dtype=np.int64)[coo.row]
        fine_row = np.asarray(row, dtype=np.int64)[coo.row]
        self._add(
            fine_col // factor,
            fine_row // factor,
            coo.col.astype(np.int64),
            coo.data.astype(np.int64),
        )

    def _add(self, col: np.ndarray, row: np.ndarray, gene: np.ndarray, values: np.ndarray) -> None:
        if len(col) == 0:
            return
        keys, values = _reduce(_bin_keys(col, row, gene, self.n_genes), values)
        self._keys.append(keys)
        self._values.append(values)
        self._pending += len(keys)
        if self._pending > _COMPACT_FACTOR * max(self._compacted, 1_000_000):
            self._compact()

    def _compact(self) -> None:
        keys, values = _reduce(np.concatenate(self._keys), np.concatenate(self._values))
        self._keys, self._values = [keys], [values]
        self._pending = self._compacted = len(keys)

    def result(self) -> BinnedCounts:
        """The non-empty bins sorted by (row, col) and their counts (int32)."""
        if self._keys:
            self._compact()
            keys, values = self._keys[0], self._values[0]
        else:
            keys, values = np.zeros(0, np.int64), np.zeros(0, np.int64)
        return _binned(keys, values, self.n_genes, self.bin_um, self.origin_um)


def _grid(n_genes: int, bin_um: float,
          origin_um: tuple[float, float]) -> tuple[int, float, tuple[float, float]]:
    """Checked (n_genes, bin_um, origin_um) of a binning grid."""
    if n_genes < 1:
        raise ValueError("n_genes must be >= 1")
    if not bin_um > 0:
        raise ValueError(f"bin size must be > 0 um, got {bin_um}")
    return int(n_genes), float(bin_um), (float(origin_um[0]), float(origin_um[1]))


def _bin_keys(col: np.ndarray, row: np.ndarray, gene: np.ndarray, n_genes: int) -> np.ndarray:
    """One int64 key per (bin, gene): sorting keys sorts by row, then column, then gene."""
    if (np.abs(col) >= _INDEX_OFFSET).any() or (np.abs(row) >= _INDEX_OFFSET).any():
        raise ValueError(
            f"bin index beyond +-{_INDEX_OFFSET} bins: coordinates are not micrometres, or the "
            "origin is far from the tissue"
        )
    if (gene < 0).any() or (gene >= n_genes).any():
        raise ValueError(f"gene index outside 0..{n_genes - 1}")
    return (((row + _INDEX_OFFSET) << _INDEX_BITS) | (col + _INDEX_OFFSET)) * n_genes + gene


def _binned(keys: np.ndarray, values: np.ndarray, n_genes: int, bin_um: float,
            origin_um: tuple[float, float]) -> BinnedCounts:
    """BinnedCounts from sorted unique (bin, gene) keys and their summed counts."""
    if len(values) and values.max() > np.iinfo(np.int32).max:
        raise ValueError("a bin's count exceeds int32")
    # Keys are sorted and unique, so bins come out in order: build the CSR straight from the run
    # boundaries instead of a second unique + COO conversion.
    bin_key, gene = np.divmod(keys, n_genes)
    del keys
    starts = np.flatnonzero(np.diff(bin_key, prepend=-1)) if len(bin_key) else np.zeros(0, int)
    bins = bin_key[starts]
    indptr = np.append(starts, len(bin_key)).astype(np.int64)
    matrix = sp.csr_matrix(
        (values.astype(np.int32), gene.astype(np.int32), indptr), shape=(len(bins), n_genes)
    )
    mask = (1 << _INDEX_BITS) - 1
    col = (bins & mask) - _INDEX_OFFSET
    row = (bins >> _INDEX_BITS) - _INDEX_OFFSET
    return BinnedCounts(col, row, matrix, bin_um, origin_um)


class BandedBinner:
    """Square binning of points with memory bounded by one band of bin rows, not the section.

    Why: a section's transcripts come in no spatial order, so a `BinAccumulator` must hold every
    non-empty (bin, gene) pair of the section until the end (~70 bytes each: 1.5 GB for 20 M
    transcripts). Here pass 1 (`add_points`) appends each point's (bin, gene) key to the
    temporary file of its band of `band_um` (unlinked files: nothing is left after a crash), and
    pass 2 (`bands`) sums one band at a time and yields its bins in (row, col) order: the bands
    concatenated equal `BinAccumulator.result()`.
    """

    def __init__(self, n_genes: int, bin_um: float, *, band_um: float = 512.0,
                 origin_um: tuple[float, float] = (0.0, 0.0)) -> None:
        self.n_genes, self.bin_um, self.origin_um = _grid(n_genes, bin_um, origin_um)
        self.band_rows = max(1, round(band_um / bin_um))
        self._files: dict[int, IO[bytes]] = {}

    def add_points(self, x_um: np.ndarray, y_um: np.ndarray, gene: np.ndarray) -> None:
        """Add points (one molecule each) in micrometres."""
        col, row = bin_of(x_um, y_um, self.bin_um, self.origin_um)
        keys = _bin_keys(col, row, np.asarray(gene, dtype=np.int64), self.n_genes)
        band = row // self.band_rows
        order = np.argsort(band, kind="stable")
        bands, starts = np.unique(band[order], return_index=True)
        for b, chunk in zip(bands.tolist(), np.split(keys[order], starts[1:]), strict=True):
            handle = self._files.get(b)
            if handle is None:
                handle = self._files[b] = tempfile.TemporaryFile()
            handle.write(chunk.tobytes())

    def bands(self) -> Iterator[BinnedCounts]:
        """Each band's non-empty bins, in (row, col) order, bands top to bottom (files closed)."""
        for b in sorted(self._files):
            handle = self._files.pop(b)
            with handle:
                handle.seek(0)
                keys = np.frombuffer(handle.read(), np.int64)
            keys, counts = np.unique(keys, return_counts=True)
            yield _binned(keys, counts, self.n_genes, self.bin_um, self.origin_um)

    def close(self) -> None:
        """Drop the temporary files of bands not read."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def _reduce(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum values per distinct key; keys come back sorted.

    Sort + reduceat rather than np.unique(return_inverse) + bincount: no inverse array and no
    float64 weights, about a third less peak memory on tens of millions of keys.
    """
    if len(keys) == 0:
        return keys, values
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    values = values[order]
    del order
    starts = np.flatnonzero(np.diff(keys, prepend=keys[0] - 1))
    return keys[starts], np.add.reduceat(values, starts)
