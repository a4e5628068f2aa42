"""A units x genes count matrix kept on disk and read back by rows.

Why: a dense platform's matrix (a full-size Visium HD section summed to 8 um holds ~20 M
non-zeros, a 2 um one ~10x more) must not be whole in memory while its patches are cut, or peak
memory grows with the section. Adapters append rows as they are produced (in any unit order);
the write stage reads back only the rows of the pairs it is writing. A store made with no rows
grows by `append_rows` (bins emitted band by band). scipy has no out-of-core
sparse matrix and anndata's backed mode needs a complete h5ad written first, so this is a
minimal CSR-by-rows store of our own.

The values and column indices go to two anonymous temporary files (`tempfile.TemporaryFile`:
unlinked at creation, so a killed process leaves nothing behind); per unit the store keeps the
offset and length of its entries (16 bytes a unit). Reads use `os.pread` on
the runs of units that are contiguous in the files, so file pages are never mapped into the
process. Pickling (Dask hands a Section between workers) carries the rows themselves.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

VALUE_DTYPE = np.dtype(np.int32)
INDEX_DTYPE = np.dtype(np.int32)


class CountsStore:
    """Raw integer counts of `n_units` rows x `n_genes` columns, rows written once each."""

    def __init__(self, n_units: int, n_genes: int, scratch: str | os.PathLike[str] | None = None):
        self.shape = (int(n_units), int(n_genes))
        self.dtype = VALUE_DTYPE
        self._scratch = scratch
        self._values: IO[bytes] = tempfile.TemporaryFile(dir=scratch)
        self._indices: IO[bytes] = tempfile.TemporaryFile(dir=scratch)
        self._offset = np.full(self.shape[0], -1, np.int64)  # first entry of each row; -1 unset
        self._length = np.zeros(self.shape[0], np.int64)
        self.nnz = 0

    # ------------------------------------------------------------------ writing
    def write_rows(self, units: np.ndarray, counts: sp.csr_matrix) -> None:
        """Store `counts` (one row per entry of `units`) as those units' rows."""
        units = np.asarray(units, np.int64)
        counts = sp.csr_matrix(counts)
        if counts.shape != (len(units), self.shape[1]):
            raise ValueError(f"rows of shape {counts.shape} for {len(units)} units x "
                             f"{self.shape[1]} genes")
        if len(units) and (units.min() < 0 or units.max() >= self.shape[0]):
            raise ValueError(f"unit index outside 0..{self.shape[0] - 1}")
        if (self._offset[units] >= 0).any() or len(np.unique(units)) < len(units):
            raise ValueError("a unit's row is written twice")
        if not np.issubdtype(counts.dtype, np.integer):
            raise ValueError("counts must be raw integers")
        if counts.nnz and counts.data.min() < 0:
            raise ValueError("counts must be non-negative")
        counts.sum_duplicates()
        counts.sort_indices()
        self._values.write(counts.data.astype(VALUE_DTYPE, copy=False).tobytes())
        self._indices.write(counts.indices.astype(INDEX_DTYPE, copy=False).tobytes())
        self._offset[units] = self.nnz + counts.indptr[:-1]
        self._length[units] = np.diff(counts.indptr)
        self.nnz += counts.nnz

    def append_rows(self, counts: sp.csr_matrix) -> None:
        """Store `counts` as new rows after the last (the store grows by their number)."""
        n, first = counts.shape[0], self.shape[0]
        self._offset = np.concatenate([self._offset, np.full(n, -1, np.int64)])
        self._length = np.concatenate([self._length, np.zeros(n, np.int64)])
        self.shape = (first + n, self.shape[1])
        self.write_rows(np.arange(first, first + n), counts)

    def finish(self) -> CountsStore:
        """Check every row was written (units with no counts are written as empty rows)."""
        missing = np.flatnonzero(self._offset < 0)
        if len(missing):
            raise ValueError(f"{len(missing)} units have no row (first: {missing[0]})")
        self._values.flush()
        self._indices.flush()
        return self

    # ------------------------------------------------------------------ reading
    def row_lengths(self) -> np.ndarray:
        """Stored entries of each unit; -1 for a unit whose row is not written yet."""
        return np.where(self._offset < 0, -1, self._length)

    def rows(self, units: np.ndarray) -> sp.csr_matrix:
        """The rows of `units`, in that order, as a CSR matrix."""
        units = np.asarray(units, np.int64)
        order = np.argsort(self._offset[units], kind="stable")  # file order
        start = self._offset[units][order]
        length = self._length[units][order]
        stop = start + length
        # runs of rows that follow each other in the files: one read per run and file
        breaks = np.flatnonzero(start[1:] != stop[:-1]) + 1
        firsts, lasts = np.r_[0, breaks], np.r_[breaks, len(order)]
        spans = [(int(start[a]), int(stop[b - 1])) for a, b in zip(firsts, lasts, strict=True)
                 if b > a and stop[b - 1] > start[a]]
        values = [self._read(self._values, lo, hi, VALUE_DTYPE) for lo, hi in spans]
        indices = [self._read(self._indices, lo, hi, INDEX_DTYPE) for lo, hi in spans]
        indptr = np.zeros(len(units) + 1, np.int64)
        np.cumsum(length, out=indptr[1:])
        in_file_order = sp.csr_matrix(
            (np.concatenate(values) if values else np.empty(0, VALUE_DTYPE),
             np.concatenate(indices) if indices else np.empty(0, INDEX_DTYPE), indptr),
            shape=(len(units), self.shape[1]))
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return in_file_order[back]


    @staticmethod
    def _read(handle: IO[bytes], lo: int, hi: int, dtype: np.dtype) -> np.ndarray:
        size = (hi - lo) * dtype.itemsize
        data = os.pread(handle.fileno(), size, lo * dtype.itemsize)
        if len(data) != size:
            raise OSError(f"counts store: short read ({len(data)} of {size} bytes)")
        return np.frombuffer(data, dtype)

    def tocsr(self) -> sp.csr_matrix:
        """The whole matrix in memory (for small sections, AnnData export and tests)."""
        return self.rows(np.arange(self.shape[0]))

    def toarray(self) -> np.ndarray:
        """The whole matrix as a dense array."""
        return self.tocsr().toarray()

    def sum(self) -> int:
        """Sum of all counts (the values file read in 16 MB blocks)."""
        total, step = 0, 1 << 22
        for lo in range(0, self.nnz, step):
            total += int(self._read(self._values, lo, min(lo + step, self.nnz), VALUE_DTYPE)
                         .sum(dtype=np.int64))
        return total

    def close(self) -> None:
        """Release the temporary files (also done when the store is garbage-collected)."""
        self._values.close()
        self._indices.close()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"shape": self.shape, "scratch": self._scratch, "csr": self.tocsr()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["shape"], scratch=state["scratch"])  # type: ignore[misc]
        self.write_rows(np.arange(self.shape[0]), state["csr"])
        self.finish()
