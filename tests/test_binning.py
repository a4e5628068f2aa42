"""Binning: exact sums, half-open borders, streaming equals one-shot, fine-to-coarse bins."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from histmol.binning import BandedBinner, BinAccumulator, bin_of


def test_points_on_borders_go_to_exactly_one_bin() -> None:
    col, row = bin_of(np.array([0.0, 7.999, 8.0, -0.001]), np.array([0.0, 8.0, 16.0, 0.0]), 8.0)
    np.testing.assert_array_equal(col, [0, 0, 1, -1])
    np.testing.assert_array_equal(row, [0, 1, 2, 0])


def test_point_counts_sum_exactly_and_bins_sort_by_row_then_col() -> None:
    acc = BinAccumulator(n_genes=3, bin_um=10.0, origin_um=(100.0, 200.0))
    acc.add_points(np.array([101.0, 105.0, 125.0, 101.0]), np.array([201.0, 202.0, 201.0, 215.0]),
                   np.array([0, 0, 2, 1]))
    binned = acc.result()
    np.testing.assert_array_equal(binned.col, [0, 2, 0])
    np.testing.assert_array_equal(binned.row, [0, 0, 1])
    np.testing.assert_array_equal(binned.counts.toarray(), [[2, 0, 0], [0, 0, 1], [0, 1, 0]])
    x, y = binned.centres_um()
    np.testing.assert_array_equal(x, [105.0, 125.0, 105.0])
    np.testing.assert_array_equal(y, [205.0, 205.0, 215.0])


def test_streaming_in_chunks_equals_one_shot() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    x, y = rng.uniform(-50, 3000, n), rng.uniform(0, 2000, n)
    gene = rng.integers(0, 50, n)
    counts = rng.integers(1, 4, n)
    whole = BinAccumulator(50, 16.0)
    whole.add_points(x, y, gene, counts)
    chunked = BinAccumulator(50, 16.0)
    for start in range(0, n, 7_777):
        chunk = slice(start, start + 7_777)
        chunked.add_points(x[chunk], y[chunk], gene[chunk], counts[chunk])
    a, b = whole.result(), chunked.result()
    np.testing.assert_array_equal(a.col, b.col)
    np.testing.assert_array_equal(a.row, b.row)
    assert (a.counts != b.counts).nnz == 0
    assert a.counts.sum() == counts.sum()


def test_fine_bins_aggregate_by_integer_factor() -> None:
    # 2 um bins at (col, row) -> 8 um bins (factor 4)
    col = np.array([0, 3, 4, 7, 0])
    row = np.array([0, 3, 0, 0, 4])
    fine = sp.csr_matrix(np.array([[1, 0], [2, 1], [0, 5], [1, 1], [3, 0]], dtype=np.int32))
    acc = BinAccumulator(2, 8.0)
    acc.add_bins(col, row, fine, factor=4)
    binned = acc.result()
    np.testing.assert_array_equal(binned.col, [0, 1, 0])
    np.testing.assert_array_equal(binned.row, [0, 0, 1])
    np.testing.assert_array_equal(binned.counts.toarray(), [[3, 1], [1, 6], [3, 0]])


def test_bad_input_is_refused() -> None:
    acc = BinAccumulator(2, 8.0)
    with pytest.raises(ValueError, match="gene index outside 0..1"):
        acc.add_points(np.array([1.0]), np.array([1.0]), np.array([2]))
    with pytest.raises(ValueError, match="not micrometres"):
        acc.add_points(np.array([1e9]), np.array([1.0]), np.array([0]))
    with pytest.raises(ValueError, match="bin size"):
        BinAccumulator(2, 0.0)
    empty = BinAccumulator(2, 8.0).result()
    assert empty.n_bins == 0 and empty.counts.shape == (0, 2)


@pytest.mark.parametrize("band_um", [8.0, 100.0, 1e6])
def test_banded_binning_equals_accumulating_the_whole_section(band_um: float) -> None:
    """Bands of any height, fed points in any order, give BinAccumulator's bins, in its order."""
    rng = np.random.default_rng(7)
    n = 20_000
    x, y = rng.uniform(-300, 900, n), rng.uniform(-250, 1200, n)
    gene = rng.integers(0, 40, n)
    whole = BinAccumulator(40, 16.0)
    whole.add_points(x, y, gene)
    expected = whole.result()
    banded = BandedBinner(40, 16.0, band_um=band_um)
    for chunk in np.array_split(rng.permutation(n), 7):
        banded.add_points(x[chunk], y[chunk], gene[chunk])
    bands = list(banded.bands())
    assert len(bands) == len(np.unique(expected.row // banded.band_rows))
    assert all(len(np.unique(b.row // banded.band_rows)) == 1 for b in bands)
    np.testing.assert_array_equal(np.concatenate([b.row for b in bands]), expected.row)
    np.testing.assert_array_equal(np.concatenate([b.col for b in bands]), expected.col)
    stacked = sp.vstack([b.counts for b in bands], format="csr")
    assert (stacked != expected.counts).nnz == 0 and stacked.sum() == n
    assert list(banded.bands()) == []  # each band is read once, its file closed


def test_banded_binning_refuses_bad_points() -> None:
    banded = BandedBinner(3, 8.0)
    with pytest.raises(ValueError, match="gene index outside"):
        banded.add_points(np.array([1.0]), np.array([1.0]), np.array([3]))
    with pytest.raises(ValueError, match="not micrometres"):
        banded.add_points(np.array([1e9]), np.array([1.0]), np.array([0]))
    banded.add_points(np.array([1.0]), np.array([1.0]), np.array([0]))
    banded.close()
    assert list(banded.bands()) == []
