"""Raw counts are integers in 0..int32 max or refused, naming the file, where, and the value.

Readers covered here: 10x MEX (``matrix.mtx.gz``, the case scipy's mmread truncated: declared
``integer`` holding 2.5) and 10x HDF5 (whole and by barcode chunks). GEM/GEF, seq-scope MTX,
HDST, CSV tables, h5ad and legacy ST have their cases in their adapter tests.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import pytest

from histmol.errors import BundleError
from platform_adapters._counts import INT32_MAX, check_counts
from platform_adapters._tenx import TenxH5Chunks, read_10x_h5, read_10x_mex

FEATURES = ["ENSG00000111640\tGAPDH\tGene Expression", "ENSG00000211592\tIGKC\tGene Expression"]
BARCODES = ["AAAC-1", "AAAG-1", "AACC-1"]


def write_mex(folder: Path, entries: list[str], *, field: str = "integer",
              n_entries: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"%%MatrixMarket matrix coordinate {field} general", "%metadata_json: {}",
             f"2 3 {len(entries) if n_entries is None else n_entries}", *entries]
    (folder / "matrix.mtx.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (folder / "features.tsv.gz").write_bytes(gzip.compress(("\n".join(FEATURES) + "\n").encode()))
    (folder / "barcodes.tsv.gz").write_bytes(gzip.compress(("\n".join(BARCODES) + "\n").encode()))
    return folder


def test_mex_integer_counts_round_trip(tmp_path: Path) -> None:
    matrix = read_10x_mex(write_mex(tmp_path / "m", ["1 1 3", "2 3 7", "1 2 1"]))
    assert matrix.counts.dtype == np.int32
    np.testing.assert_array_equal(matrix.counts.toarray(), [[3, 0], [1, 0], [0, 7]])
    real = read_10x_mex(write_mex(tmp_path / "r", ["1 1 3.0", "2 3 7"], field="real"))
    np.testing.assert_array_equal(real.counts.toarray(), [[3, 0], [0, 0], [0, 7]])


@pytest.mark.parametrize(("entry", "why"), [
    ("2 3 2.5", "count 2.5 is not an integer"),
    ("2 3 -1", "count -1.0 is negative"),
    ("2 3 nan", "count nan is not a finite number"),
    (f"2 3 {INT32_MAX + 1}", f"count {float(INT32_MAX + 1)} is above the int32 maximum"),
])
def test_mex_declared_integer_with_a_bad_value_is_refused(tmp_path: Path, entry: str,
                                                          why: str) -> None:
    folder = write_mex(tmp_path / "m", ["1 1 3", entry, "1 2 1"])
    with pytest.raises(BundleError, match=rf"{folder}/matrix.mtx.gz: line 5: {why}"):
        read_10x_mex(folder)


def test_mex_structure_errors_name_the_line(tmp_path: Path) -> None:
    folder = write_mex(tmp_path / "m", ["1 1 3", "3 1 1"])
    with pytest.raises(BundleError, match=r"matrix.mtx.gz: line 5: row index 3.0 is outside 1..2"):
        read_10x_mex(folder)
    write_mex(folder, ["1 1 3"], n_entries=2)
    with pytest.raises(BundleError, match=r"declares 2 entries, the file holds 1 \(truncated\?\)"):
        read_10x_mex(folder)
    write_mex(folder, ["1 1 3"], field="complex")
    with pytest.raises(BundleError, match=r"matrix.mtx.gz: line 1: not a MatrixMarket"):
        read_10x_mex(folder)


def write_h5(path: Path, data: np.ndarray) -> Path:
    """Three barcodes x two features, CSC over barcodes as 10x writes it: one entry each."""
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        group["barcodes"] = np.array(BARCODES, dtype="S")
        group["data"] = data
        group["indices"] = np.array([0, 1, 1], np.int64)
        group["indptr"] = np.array([0, 1, 2, 3], np.int64)
        group["shape"] = np.array([2, 3], np.int32)
        features = group.create_group("features")
        features["id"] = np.array([f.split("\t")[0] for f in FEATURES], dtype="S")
        features["name"] = np.array([f.split("\t")[1] for f in FEATURES], dtype="S")
        features["feature_type"] = np.array([b"Gene Expression"] * 2)
    return path


def test_h5_fractional_and_huge_counts_are_refused(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "a.h5", np.array([1.0, 2.5, 4.0], np.float32))
    where = r"unit row 1 \(AAAG-1\), feature column 1 \(ENSG00000211592\)"
    with pytest.raises(BundleError, match=rf"a.h5: {where}: count 2.5 is not an integer"):
        read_10x_h5(path)
    path = write_h5(tmp_path / "b.h5", np.array([1, 2, INT32_MAX + 5], np.int64))
    with TenxH5Chunks(path) as chunks, pytest.raises(
            BundleError, match=r"b.h5: unit row 2, feature column 1: count 2147483652 is above"):
        chunks.counts(1, 3)
    assert read_10x_h5(write_h5(tmp_path / "c.h5", np.array([1, 2, 3], np.int64))).counts.sum() == 6


def test_check_counts_returns_int64_and_names_the_first_bad_element() -> None:
    values = check_counts(np.array([0.0, 3.0, float(INT32_MAX)]), Path("f.tsv"), str)
    assert values.dtype == np.int64 and values.tolist() == [0, 3, INT32_MAX]
    with pytest.raises(BundleError, match=r"f.tsv: at 2: count 0.25 is not an integer"):
        check_counts(np.array([1, 2, 0.25, -1]), Path("f.tsv"), lambda i: f"at {i}")
    with pytest.raises(BundleError, match="counts are not numeric"):
        check_counts(np.array(["1"]), Path("f.tsv"), str)
