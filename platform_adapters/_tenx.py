"""10x Genomics feature-barcode matrix readers, shared by the Visium and Visium HD adapters.

Formats (10x "Feature-Barcode Matrices" and "HDF5 Feature-Barcode Matrix Format" docs):
- HDF5 (Cell Ranger >= 3, every Space Ranger): group `matrix` with `data`, `indices`, `indptr`,
  `shape` (n_features, n_barcodes; CSC, one column per barcode), `barcodes`, and
  `features/{id,name,feature_type,genome}`.
- HDF5 (Cell Ranger 2, legacy): one group per genome with `data`, `indices`, `indptr`, `shape`,
  `barcodes`, `genes` (ids) and `gene_names`; no feature types.
- MEX folder: `matrix.mtx[.gz]` (MatrixMarket, features x barcodes), `barcodes.tsv[.gz]` and
  `features.tsv[.gz]` (id, name, feature_type; Cell Ranger 3+) or `genes.tsv` (id, name; Cell
  Ranger 2).

The HDF5 is read with h5py directly rather than `scanpy.read_10x_h5`: the CSC arrays of a 10x
file are exactly the CSR arrays of the barcodes x features matrix we want, so h5py hands them
over with no AnnData construction, no var-name mangling and no dense copies (faster, leaner).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.errors import BundleError
from platform_adapters._common import as_int32_counts

GENE_EXPRESSION = "Gene Expression"


class TenxH5Keys(StrEnum):
    """Dataset names inside a 10x feature-barcode HDF5 file."""

    MATRIX_GROUP = "matrix"  # Cell Ranger >= 3; CR 2 has one group per genome instead
    DATA = "data"
    INDICES = "indices"
    INDPTR = "indptr"
    SHAPE = "shape"
    BARCODES = "barcodes"
    FEATURES_GROUP = "features"
    FEATURE_ID = "id"
    FEATURE_NAME = "name"
    FEATURE_TYPE = "feature_type"
    GENOME = "genome"
    LEGACY_GENE_IDS = "genes"  # Cell Ranger 2
    LEGACY_GENE_NAMES = "gene_names"  # Cell Ranger 2


class TenxMexFiles(StrEnum):
    """File names inside a 10x MEX matrix folder (each may also be gzipped, `.gz`)."""

    MATRIX = "matrix.mtx"
    BARCODES = "barcodes.tsv"
    FEATURES = "features.tsv"  # Cell Ranger >= 3: id, name, feature_type
    GENES = "genes.tsv"  # Cell Ranger 2: id, name


@dataclass(frozen=True)
class FeatureBarcodeMatrix:
    """A 10x matrix as barcodes x features CSR int32 plus its labels."""

    path: Path
    counts: sp.csr_matrix
    barcodes: np.ndarray
    feature_ids: np.ndarray
    feature_names: np.ndarray
    feature_types: np.ndarray

    def only_feature_type(self, feature_type: str = GENE_EXPRESSION) -> FeatureBarcodeMatrix:
        """Keep only features of one type (antibody capture, CRISPR guides... are not genes)."""
        keep = self.feature_types == feature_type
        if keep.all():
            return self
        columns = np.flatnonzero(keep)
        return FeatureBarcodeMatrix(
            path=self.path,
            counts=sp.csr_matrix(self.counts[:, columns]),
            barcodes=self.barcodes,
            feature_ids=self.feature_ids[columns],
            feature_names=self.feature_names[columns],
            feature_types=self.feature_types[columns],
        )


def read_scalefactors(path: Path) -> dict[str, float]:
    """The numeric entries of a Space Ranger `scalefactors_json.json` (Visium, HD bins, cells).

    Raises BundleError naming `path` when it is unreadable or not a JSON object; which keys a
    reader needs, and their ranges, the reader checks (the error lists the keys found here).
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(path, f"cannot read as JSON: {err}") from err
    if not isinstance(raw, dict):
        raise BundleError(path, "expected a JSON object of scale factors")
    return {k: float(v) for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    values = dataset[()]
    return np.array(
        [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.ravel(values)],
        dtype=object,
    )


def read_10x_h5(path: Path) -> FeatureBarcodeMatrix:
    """Read a 10x feature-barcode HDF5 (Cell Ranger 3+ layout, or the legacy CR 2 layout)."""
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise BundleError(
            path, f"cannot open as HDF5 (truncated or not an HDF5 file): {err}"
        ) from err
    try:
        with handle:
            return _read_h5_group(path, handle)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise BundleError(
            path, f"cannot read the 10x matrix (truncated or malformed): {err}"
        ) from err


def _read_h5_group(path: Path, handle: h5py.File) -> FeatureBarcodeMatrix:
    keys = TenxH5Keys
    if keys.MATRIX_GROUP in handle:
        group = handle[keys.MATRIX_GROUP]
        if keys.FEATURES_GROUP not in group:
            raise BundleError(
                path, f"group 'matrix' lacks 'features'; found {sorted(group.keys())}"
            )
        features = group[keys.FEATURES_GROUP]
        ids = _strings(features[keys.FEATURE_ID])
        names = _strings(features[keys.FEATURE_NAME])
        types = (
            _strings(features[keys.FEATURE_TYPE])
            if keys.FEATURE_TYPE in features
            else np.full(len(ids), GENE_EXPRESSION, dtype=object)
        )
    else:
        groups = [k for k in handle if isinstance(handle[k], h5py.Group)]
        legacy = [g for g in groups if keys.LEGACY_GENE_IDS in handle[g]]
        if len(legacy) != 1:
            raise BundleError(
                path,
                "not a 10x feature-barcode matrix: expected group 'matrix' (Cell Ranger >= 3) or "
                f"one genome group with 'genes' (Cell Ranger 2); found groups {sorted(groups)}",
            )
        group = handle[legacy[0]]
        ids = _strings(group[keys.LEGACY_GENE_IDS])
        names = _strings(group[keys.LEGACY_GENE_NAMES]) if keys.LEGACY_GENE_NAMES in group else ids
        types = np.full(len(ids), GENE_EXPRESSION, dtype=object)
    required = [keys.DATA, keys.INDICES, keys.INDPTR, keys.SHAPE, keys.BARCODES]
    missing = [k.value for k in required if k not in group]
    if missing:
        raise BundleError(path, f"10x matrix group lacks datasets {missing}; found {sorted(group)}")
    n_features, n_barcodes = (int(v) for v in group[keys.SHAPE][()])
    barcodes = _strings(group[keys.BARCODES])
    data = group[keys.DATA][()]
    indices = group[keys.INDICES][()]
    indptr = group[keys.INDPTR][()]
    _check_shapes(path, n_features, n_barcodes, len(ids), len(barcodes), indices, indptr, data)
    # 10x stores CSC features x barcodes; the same arrays are the CSR barcodes x features matrix.
    counts = sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))
    return FeatureBarcodeMatrix(
        path=path,
        counts=as_int32_counts(counts, path),
        barcodes=barcodes,
        feature_ids=ids,
        feature_names=names,
        feature_types=types,
    )


def _check_shapes(
    path: Path,
    n_features: int,
    n_barcodes: int,
    n_ids: int,
    n_labels: int,
    indices: np.ndarray,
    indptr: np.ndarray,
    data: np.ndarray,
) -> None:
    problems = []
    if n_ids != n_features:
        problems.append(f"{n_ids} feature ids for {n_features} features")
    if n_labels != n_barcodes:
        problems.append(f"{n_labels} barcodes for {n_barcodes} matrix columns")
    if len(indptr) != n_barcodes + 1:
        problems.append(f"indptr has {len(indptr)} entries, expected {n_barcodes + 1}")
    elif len(indptr) and (indptr[-1] != len(data) or len(indices) != len(data)):
        problems.append(
            f"indptr ends at {indptr[-1]} but data has {len(data)} and indices {len(indices)}"
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= n_features):
        problems.append("feature indices out of range")
    if problems:
        raise BundleError(path, "inconsistent 10x matrix: " + "; ".join(problems))


def _mex_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


def read_10x_mex(folder: Path) -> FeatureBarcodeMatrix:
    """Read a 10x MEX folder (matrix.mtx, barcodes.tsv, features.tsv or genes.tsv; gz or not)."""
    files = TenxMexFiles
    matrix_file = _mex_file(folder, files.MATRIX)
    barcodes_file = _mex_file(folder, files.BARCODES)
    features_file = _mex_file(folder, files.FEATURES) or _mex_file(folder, files.GENES)
    wanted = {
        "matrix.mtx[.gz]": matrix_file,
        "barcodes.tsv[.gz]": barcodes_file,
        "features.tsv[.gz] (Cell Ranger >= 3) or genes.tsv[.gz] (Cell Ranger 2)": features_file,
    }
    missing = [name for name, found in wanted.items() if found is None]
    if missing:
        raise BundleError(folder, f"10x matrix folder lacks {missing}")
    assert matrix_file is not None and barcodes_file is not None and features_file is not None
    import scipy.io  # imported here: only the MatrixMarket layout needs it (~0.1-0.3 s)

    try:
        opener = gzip.open if matrix_file.suffix == ".gz" else open
        with opener(matrix_file, "rb") as handle:
            matrix = scipy.io.mmread(handle)
    except (OSError, ValueError, EOFError) as err:
        raise BundleError(matrix_file, f"cannot read as MatrixMarket: {err}") from err
    barcodes = _read_tsv(barcodes_file, min_columns=1)[0].to_numpy(dtype=object)
    features = _read_tsv(features_file, min_columns=1)
    ids = features[0].to_numpy(dtype=object)
    names = features[1].to_numpy(dtype=object) if features.shape[1] > 1 else ids
    types = (
        features[2].to_numpy(dtype=object)
        if features.shape[1] > 2
        else np.full(len(ids), GENE_EXPRESSION, dtype=object)
    )
    n_features, n_barcodes = matrix.shape
    if n_features != len(ids) or n_barcodes != len(barcodes):
        raise BundleError(
            matrix_file,
            f"matrix is {n_features} features x {n_barcodes} barcodes but {features_file.name} "
            f"lists {len(ids)} features and {barcodes_file.name} {len(barcodes)} barcodes",
        )
    counts = sp.csr_matrix(sp.coo_matrix(matrix).T)
    return FeatureBarcodeMatrix(
        path=folder,
        counts=as_int32_counts(counts, matrix_file),
        barcodes=barcodes,
        feature_ids=ids,
        feature_names=names,
        feature_types=types,
    )


def _read_tsv(path: Path, *, min_columns: int) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as tab-separated text: {err}") from err
    if frame.shape[1] < min_columns or len(frame) == 0:
        raise BundleError(path, f"expected at least {min_columns} column(s) and one row")
    return frame


def read_10x_matrix(path: Path) -> FeatureBarcodeMatrix:
    """Read a 10x matrix given as an `.h5` file or a MEX folder."""
    if path.is_dir():
        return read_10x_mex(path)
    return read_10x_h5(path)


class TenxH5Chunks:
    """A Cell Ranger >= 3 feature-barcode HDF5 read by barcode ranges, with bounded memory.

    Why: a 2 um Visium HD matrix holds ~11 M barcodes; reading it whole (as `read_10x_h5` does)
    would hold every 2 um bin in memory at once. The file is CSC over barcodes, so the counts of
    barcodes [start, stop) are the contiguous slice `indptr[start]:indptr[stop]` of `data` and
    `indices`, which h5py reads without touching the rest. Use as a context manager.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = h5py.File(path, "r")
        except OSError as err:
            raise BundleError(
                path, f"cannot open as HDF5 (truncated or not an HDF5 file): {err}"
            ) from err
        try:
            self._open_matrix()
        except BundleError:
            self._file.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as err:
            self._file.close()
            raise BundleError(
                path, f"cannot read the 10x matrix (truncated or malformed): {err}"
            ) from err

    def _open_matrix(self) -> None:
        keys = TenxH5Keys
        if keys.MATRIX_GROUP not in self._file:
            raise BundleError(
                self.path,
                f"not a Cell Ranger >= 3 feature-barcode matrix: no group 'matrix'; found "
                f"{sorted(self._file.keys())}",
            )
        group = self._file[keys.MATRIX_GROUP]
        required = [keys.DATA, keys.INDICES, keys.INDPTR, keys.SHAPE, keys.BARCODES,
                    keys.FEATURES_GROUP]
        missing = [k.value for k in required if k not in group]
        if missing:
            raise BundleError(
                self.path, f"10x matrix group lacks {missing}; found {sorted(group.keys())}"
            )
        features = group[keys.FEATURES_GROUP]
        self.feature_ids = _strings(features[keys.FEATURE_ID])
        self.feature_names = _strings(features[keys.FEATURE_NAME])
        self.feature_types = (
            _strings(features[keys.FEATURE_TYPE])
            if keys.FEATURE_TYPE in features
            else np.full(len(self.feature_ids), GENE_EXPRESSION, dtype=object)
        )
        self.n_features, self.n_barcodes = (int(v) for v in group[keys.SHAPE][()])
        self._data, self._indices = group[keys.DATA], group[keys.INDICES]
        self._indptr, self._barcodes = group[keys.INDPTR], group[keys.BARCODES]
        self.nnz = len(self._data)
        problems = []
        if len(self.feature_ids) != self.n_features:
            problems.append(f"{len(self.feature_ids)} feature ids for {self.n_features} features")
        if len(self._barcodes) != self.n_barcodes:
            problems.append(f"{len(self._barcodes)} barcodes for {self.n_barcodes} columns")
        if len(self._indptr) != self.n_barcodes + 1:
            problems.append(
                f"indptr has {len(self._indptr)} entries, expected {self.n_barcodes + 1}"
            )
        elif int(self._indptr[-1]) != len(self._data) or len(self._indices) != len(self._data):
            problems.append(
                f"indptr ends at {int(self._indptr[-1])} but data has {len(self._data)} and "
                f"indices {len(self._indices)}"
            )
        if problems:
            raise BundleError(self.path, "inconsistent 10x matrix: " + "; ".join(problems))

    def __enter__(self) -> TenxH5Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def ranges(self, chunk: int) -> list[tuple[int, int]]:
        """Barcode ranges [start, stop) of at most `chunk` barcodes covering the matrix."""
        return [(s, min(s + chunk, self.n_barcodes)) for s in range(0, self.n_barcodes, chunk)]

    def barcodes(self, start: int, stop: int) -> np.ndarray:
        """Barcodes [start, stop) as fixed-width bytes (no Python string per barcode)."""
        try:
            values = self._barcodes[start:stop]
        except (OSError, ValueError, TypeError) as err:
            raise BundleError(self.path, f"cannot read barcodes {start}..{stop}: {err}") from err
        if values.dtype.kind == "S":
            return values
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in values], "S")

    def counts(self, start: int, stop: int) -> sp.csr_matrix:
        """Read the counts of barcodes [start, stop): CSR int32, barcodes x features, checked."""
        try:
            indptr = self._indptr[start : stop + 1].astype(np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            if np.any(np.diff(indptr) < 0) or lo < 0 or hi > len(self._data):
                raise BundleError(
                    self.path, f"indptr is not non-decreasing at barcodes {start}..{stop}"
                )
            data = self._data[lo:hi]
            indices = self._indices[lo:hi].astype(np.int64)
        except (OSError, ValueError, TypeError) as err:
            raise BundleError(
                self.path, f"cannot read the counts of barcodes {start}..{stop} (truncated?): {err}"
            ) from err
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_features):
            raise BundleError(
                self.path, f"feature indices out of range at barcodes {start}..{stop}"
            )
        matrix = sp.csr_matrix(
            (data, indices, indptr - lo), shape=(stop - start, self.n_features)
        )
        return as_int32_counts(matrix, self.path)
