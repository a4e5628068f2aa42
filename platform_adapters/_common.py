"""Small helpers shared by the platform adapters: file checks, id joins, transform files, genes.

Everything here raises `BundleError(path, problem)` naming the file and the problem; nothing here
writes anywhere.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.errors import BundleError, ConfigError
from histmol.genes import gene_table, merge_duplicate_genes, split_controls
from histmol.section import Provenance, Section, slugify, validate_section_id
from platform_adapters._counts import check_counts

EXAMPLES = 5  # how many offending values an error message quotes


def bundle_folder(bundle: str | os.PathLike[str]) -> Path:
    """The bundle as a Path; it must be an existing folder."""
    path = Path(bundle)
    if not path.exists():
        raise BundleError(path, "bundle folder does not exist")
    if not path.is_dir():
        raise BundleError(path, "bundle must be a folder, not a file")
    return path


def default_section_id(folder: Path, section_id: str | None) -> str:
    """`section_id` if given, else the slug of the bundle folder's name.

    A folder named `outs` (Space Ranger's output folder) takes its parent's name, so two
    `<sample>/outs` bundles do not both become section "outs".
    """
    if section_id is not None:
        return validate_section_id(section_id)
    name = folder.resolve().name
    if name.lower() == "outs" and folder.resolve().parent.name:
        name = folder.resolve().parent.name
    return slugify(name)


def check_min_match_rate(min_match_rate: float) -> float:
    """Validate the match-rate threshold (a fraction in [0, 1])."""
    rate = float(min_match_rate)
    if not 0.0 <= rate <= 1.0 or np.isnan(rate):
        raise ConfigError(f"min_match_rate must be a fraction in [0, 1], got {min_match_rate!r}")
    return rate


def explicit_file(path: str | os.PathLike[str], what: str) -> Path:
    """An explicitly given file (option override) that must exist."""
    result = Path(path)
    if not result.exists():
        raise BundleError(result, f"{what} given explicitly does not exist")
    return result


def open_text(path: Path) -> IO[str]:
    """Open a text file, transparently gunzipping `*.gz`."""
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as err:
        raise BundleError(path, f"cannot open: {err}") from err


def first_line(path: Path) -> str:
    """The first line of a (possibly gzipped) text file, without its newline."""
    try:
        with open_text(path) as handle:
            return handle.readline().rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise BundleError(path, f"cannot read as text: {err}") from err


def require_columns(
    frame: pd.DataFrame, expected: Iterable[str], path: Path, what: str
) -> None:
    """Raise naming the file, the columns found and the columns expected when any is missing."""
    expected = list(expected)
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise BundleError(
            path,
            f"{what} lacks columns {missing}; found columns {list(map(str, frame.columns))}, "
            f"expected {expected}",
        )


@dataclass(frozen=True)
class Join:
    """Result of an inner join of matrix ids onto position ids."""

    matrix_index: np.ndarray  # rows of the matrix that have a position, in matrix order
    positions_index: np.ndarray  # the matching rows of the positions table
    n_matrix: int
    n_matched: int

    @property
    def match_rate(self) -> float:
        """Matched matrix ids / matrix ids."""
        return self.n_matched / self.n_matrix if self.n_matrix else 0.0


def inner_join_ids(
    matrix_ids: Sequence[str] | np.ndarray,
    position_ids: Sequence[str] | np.ndarray,
    *,
    matrix_file: Path,
    positions_file: Path,
    min_match_rate: float,
    what: str = "barcodes",
) -> Join:
    """Inner-join matrix ids onto position ids; fail under `min_match_rate`.

    The match rate is (matrix ids that have a position) / (matrix ids): positions without
    expression (spots outside tissue) are normal, expression without a position is not.
    """
    matrix_index = pd.Index(np.asarray(matrix_ids, dtype=object))
    positions = pd.Index(np.asarray(position_ids, dtype=object))
    if len(matrix_index) == 0:
        raise BundleError(matrix_file, f"holds no {what}")
    for index, path in ((matrix_index, matrix_file), (positions, positions_file)):
        if not index.is_unique:
            dupes = index[index.duplicated()].unique()[:EXAMPLES].tolist()
            raise BundleError(path, f"duplicate {what}, e.g. {dupes}")
    found = positions.get_indexer(matrix_index)
    matched = found >= 0
    join = Join(
        matrix_index=np.flatnonzero(matched),
        positions_index=found[matched],
        n_matrix=len(matrix_index),
        n_matched=int(matched.sum()),
    )
    if join.match_rate < min_match_rate:
        unmatched = matrix_index[~matched][:EXAMPLES].tolist()
        raise BundleError(
            matrix_file,
            f"only {join.n_matched} of {join.n_matrix} {what} ({join.match_rate:.2%}) have a "
            f"position in {positions_file}; min_match_rate is {min_match_rate:.2%}. "
            f"Unmatched examples: {unmatched}",
        )
    return join


_NUMBER = re.compile(r"[,\s]+")


def read_transform(path: Path, *, order: Literal["row", "column"] = "row") -> np.ndarray:
    """Read a 3x3 matrix from a text file of 9 numbers (comma, tab or space separated).

    `order="row"`: 3 lines of 3 numbers (or 9 numbers in row-major order).
    `order="column"`: 9 numbers in column-major order, as the ST spot detector exports its
    array-to-pixel affine (`m00 m10 m20 m01 m11 m21 m02 m12 m22`; see its
    `client/src/app/viewer.directive.js`, `getTransformationMatrix`).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(path, f"cannot read transform: {err}") from err
    tokens = [t for t in _NUMBER.split(text.strip()) if t]
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as err:
        raise BundleError(path, f"transform holds a non-number: {err}") from err
    if values.size != 9:
        raise BundleError(
            path, f"transform must hold 9 numbers (a 3x3 matrix), found {values.size}"
        )
    matrix = values.reshape(3, 3)
    if order == "column":
        matrix = matrix.T
    if not np.isfinite(matrix).all():
        raise BundleError(path, f"transform holds non-finite values: {matrix.tolist()}")
    return matrix


def as_int32_counts(
    matrix: sp.spmatrix | np.ndarray, path: Path, *, first_row: int = 0,
    row_names: np.ndarray | None = None, col_names: np.ndarray | None = None,
) -> sp.csr_matrix:
    """CSR int32 raw counts (units x features); `check_counts` names `path`, unit and feature.

    `first_row` is the matrix's first row in the file (block readers); `row_names` and
    `col_names` label units and features in the error when given.
    """
    csr = sp.csr_matrix(matrix)

    def where(i: int) -> str:
        row = int(np.searchsorted(csr.indptr, i, side="right")) - 1
        col = int(csr.indices[i])
        unit = f" ({row_names[row]})" if row_names is not None else ""
        feature = f" ({col_names[col]})" if col_names is not None else ""
        return f"unit row {first_row + row}{unit}, feature column {col}{feature}"

    check_counts(csr.data, path, where)
    csr = sp.csr_matrix(csr, dtype=np.int32)
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


@dataclass(frozen=True)
class GenePanel:
    """Genes, counts and per-unit control totals after control split and duplicate merge."""

    genes: pd.DataFrame
    counts: sp.csr_matrix
    control_counts: pd.DataFrame
    n_controls: int


def build_gene_panel(
    ids: Sequence[str] | np.ndarray,
    names: Sequence[str] | np.ndarray,
    counts: sp.csr_matrix,
) -> GenePanel:
    """Gene keys via `histmol.genes`: controls split out, features resolved, duplicates summed.

    Features are resolved to the gene reference after the control split; features resolving to
    one gene are summed.
    """
    features = pd.DataFrame({
        "id": pd.Series(np.asarray(ids, dtype=object)).astype(str).str.strip(),
        "symbol": pd.Series(np.asarray(names, dtype=object)).astype(str).str.strip(),
    })
    n_features = len(features)
    features, counts, controls = split_controls(features, counts)
    n_controls = n_features - len(features)
    genes = gene_table(features["id"].to_numpy(object), features["symbol"].to_numpy(object))
    genes, counts = merge_duplicate_genes(genes, counts)
    counts = sp.csr_matrix(counts, dtype=np.int32)
    counts.sort_indices()
    return GenePanel(genes=genes, counts=counts, control_counts=controls, n_controls=n_controls)


@dataclass(frozen=True)
class StreamedPanel:
    """`build_gene_panel` for a matrix that arrives in row pieces (dense platforms).

    Control split and duplicate merge are linear maps on the feature columns, so they are
    derived once by running `build_gene_panel` on the identity matrix: `to_genes` (features x
    genes) and `to_controls` (features x control categories). Each piece then goes through two
    sparse products, with exactly the values `build_gene_panel` gives on the whole matrix.
    """

    genes: pd.DataFrame
    n_controls: int
    control_names: tuple[str, ...]
    to_genes: sp.csr_matrix
    to_controls: np.ndarray

    @classmethod
    def of(cls, ids: Sequence[str] | np.ndarray,
           names: Sequence[str] | np.ndarray) -> StreamedPanel:
        """The panel of these features (ids and names as `build_gene_panel` takes them)."""
        identity = sp.identity(len(ids), dtype=np.int32, format="csr")
        panel = build_gene_panel(ids, names, identity)
        return cls(panel.genes, panel.n_controls, tuple(panel.control_counts.columns),
                   panel.counts, panel.control_counts.to_numpy(np.int64))

    def apply(self, counts: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
        """A piece's gene counts (CSR int32, sorted) and control totals (units x categories)."""
        genes = sp.csr_matrix(counts @ self.to_genes, dtype=np.int32)
        genes.sort_indices()
        controls = (np.asarray(counts @ self.to_controls, dtype=np.int64) if self.control_names
                    else np.zeros((counts.shape[0], 0), np.int64))
        return genes, controls


def check_native_to_wsi(native_to_wsi: np.ndarray | None) -> np.ndarray | None:
    """Validate an explicit transform's shape (registration checks singularity and handedness)."""
    if native_to_wsi is None:
        return None
    matrix = np.asarray(native_to_wsi, dtype=np.float64)
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise ConfigError(f"native_to_wsi must be a finite 3x3 matrix, got {matrix.tolist()}")
    return matrix


def metadata_dict(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A plain str -> str copy of the caller's metadata."""
    return {str(k): str(v) for k, v in (metadata or {}).items()}


def panel_section(
    platform: str,
    adapter_version: str,
    folder: Path,
    *,
    section_id: str | None,
    wsi: str | os.PathLike[str],
    units: pd.DataFrame,
    panel: GenePanel,
    files: Iterable[str | os.PathLike[str]],
    layout: str,
    metadata: Mapping[str, str] | None,
    **frame: Any,
) -> Section:
    """The Section an adapter returns: id, panel and provenance filled the same way everywhere.

    `frame` carries what differs per platform: unit_shape, unit_size_um, pitch_um, default_mode,
    native_to_wsi, native_um_per_unit, qc.
    """
    return Section(
        section_id=default_section_id(folder, section_id),
        platform=platform,
        units=units,
        counts=panel.counts,
        genes=panel.genes,
        wsi_path=Path(wsi),
        provenance=Provenance(
            platform, adapter_version, str(folder), tuple(str(f) for f in files), layout
        ),
        control_counts=panel.control_counts,
        metadata=metadata_dict(metadata),
        **frame,
    )
