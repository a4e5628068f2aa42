"""CountsStore: a dense platform's counts on disk, read back by rows."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from histmol.counts_store import CountsStore
from platform_adapters._common import StreamedPanel, build_gene_panel


def random_counts(n_units: int, n_genes: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.3, size=(n_units, n_genes)).astype(np.int32)
    dense[::7] = 0  # some units with no counts at all
    return sp.csr_matrix(dense)


def filled_store(matrix: sp.csr_matrix, pieces: int = 5, seed: int = 1) -> CountsStore:
    """Rows written in shuffled pieces, as an adapter emitting bands out of order would."""
    order = np.random.default_rng(seed).permutation(matrix.shape[0])
    store = CountsStore(*matrix.shape)
    for units in np.array_split(order, pieces):
        store.write_rows(units, matrix[units])
    return store.finish()


def test_rows_come_back_in_any_order_exactly() -> None:
    matrix = random_counts(400, 30)
    store = filled_store(matrix)
    assert store.shape == (400, 30) and store.nnz == matrix.nnz and store.dtype == np.int32
    assert (store.tocsr() != matrix).nnz == 0
    picks = np.random.default_rng(2).choice(400, 123, replace=False)
    got = store.rows(picks)
    assert got.dtype == np.int32 and got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), matrix[picks].toarray())
    np.testing.assert_array_equal(store.rows(np.array([7, 7, 3])).toarray(),
                                  matrix[[7, 7, 3]].toarray())  # repeats allowed on read
    assert store.rows(np.array([], np.int64)).shape == (0, 30)
    assert store.sum() == int(matrix.sum())


def test_pickling_carries_the_rows() -> None:
    matrix = random_counts(50, 8)
    copy = pickle.loads(pickle.dumps(filled_store(matrix)))
    np.testing.assert_array_equal(copy.toarray(), matrix.toarray())


def test_bad_writes_are_refused() -> None:
    store = CountsStore(4, 3)
    store.write_rows(np.array([0, 1]), sp.csr_matrix(np.array([[1, 0, 0], [0, 2, 0]], np.int32)))
    with pytest.raises(ValueError, match="written twice"):
        store.write_rows(np.array([1]), sp.csr_matrix((1, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="non-negative"):
        store.write_rows(np.array([2]), sp.csr_matrix(np.array([[0, -1, 0]], np.int32)))
    with pytest.raises(ValueError, match="raw integers"):
        store.write_rows(np.array([2]), sp.csr_matrix(np.array([[0, 1.5, 0]])))
    with pytest.raises(ValueError, match="outside"):
        store.write_rows(np.array([4]), sp.csr_matrix((1, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="for 1 units x 3 genes"):
        store.write_rows(np.array([2]), sp.csr_matrix((1, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="2 units have no row"):
        store.finish()


def test_streamed_panel_equals_the_whole_matrix_panel() -> None:
    """Controls split and duplicate genes merged piece by piece give build_gene_panel's result."""
    ids = ["ENSG00000000001", "ENSG00000000002", "NegControlProbe_1", "ENSG00000000001",
           "BLANK_0001", "ENSG00000000003", "NegControlProbe_2"]
    names = ["A", "B", "NegControlProbe_1", "A", "BLANK_0001", "C", "NegControlProbe_2"]
    matrix = random_counts(60, len(ids), seed=3)
    whole = build_gene_panel(ids, names, matrix)
    streamed = StreamedPanel.of(ids, names)
    assert streamed.genes.equals(whole.genes) and streamed.n_controls == whole.n_controls == 3
    assert streamed.control_names == tuple(whole.control_counts.columns)
    pieces = [streamed.apply(matrix[rows]) for rows in np.array_split(np.arange(60), 4)]
    genes = sp.vstack([g for g, _ in pieces], format="csr")
    assert (genes != whole.counts).nnz == 0 and genes.dtype == np.int32
    np.testing.assert_array_equal(np.vstack([c for _, c in pieces]),
                                  whole.control_counts.to_numpy(np.int64))
