"""The Section: what a platform adapter hands to the rest of the pipeline.

A section is one ST assay plus its paired H&E image. Adapters fill it from a vendor bundle and
know nothing of tiling or shards; registration then places its units on the WSI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from histmol.config import TilingMode
from histmol.counts_store import CountsStore
from histmol.errors import ConfigError

if TYPE_CHECKING:
    import anndata

UnitShape = Literal["circle", "square"]
MppSource = Literal["embedded", "scalefactors", "estimated_from_pitch", "user"]

SECTION_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
SECTION_ID_RULE = (
    "use lowercase letters, digits, '.', '_' and '-', start with a letter or digit, "
    "at most 128 characters, no '..'"
)
UNIT_COLUMNS = ("unit_id", "x_native", "y_native")
GENE_COLUMNS = ("gene_id", "symbol", "ensembl_id")


def validate_section_id(section_id: str) -> str:
    """Return `section_id` if it is a safe slug; raise otherwise (it becomes a folder name)."""
    if not isinstance(section_id, str) or not SECTION_ID_PATTERN.fullmatch(section_id):
        raise ConfigError(
            f"section id {section_id!r} is not a safe slug: {SECTION_ID_RULE} (pattern "
            f"{SECTION_ID_PATTERN.pattern})"
        )
    if section_id in {".", ".."} or ".." in section_id:
        raise ConfigError(f"section id {section_id!r} must not contain '..'")
    return section_id


def normalise_section_id(name: str) -> str:
    """The section id for a user's or cohort's name: lower-cased, then validated.

    Ids name folders, and a corpus may live on a case-insensitive file system, so ``B4`` and
    ``b4`` are one section: both `build` and `ingest` lower-case and keep the given name in the
    section's ``section_name``.
    """
    if not isinstance(name, str):
        raise ConfigError(f"section id must be a string, got {name!r}")
    try:
        return validate_section_id(name.lower())
    except ConfigError:
        raise ConfigError(
            f"section id {name!r} is not a safe slug: {SECTION_ID_RULE} (pattern "
            f"{SECTION_ID_PATTERN.pattern}; upper case is lower-cased)"
        ) from None


def slugify(text: str) -> str:
    """Turn a free-form name (a folder name, a sample name) into a valid section id."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    slug = re.sub(r"\.{2,}", ".", slug)[:128]
    return validate_section_id(slug or "section")


def _has_duplicates(ids: pd.Series) -> bool:
    """Whether an id repeats.

    Arrow-backed ids (dense platforms: millions of bins) are sorted in Arrow; pandas would first
    make one Python str per id (~1 GB for a 2 um section).
    """
    if not isinstance(ids.dtype, pd.ArrowDtype):
        return bool(ids.duplicated().any())
    values = pa.chunked_array(pa.array(ids))
    ordered = values.take(pc.array_sort_indices(values))
    n = len(values)
    return n > 1 and bool(pc.any(pc.equal(ordered.slice(1), ordered.slice(0, n - 1))).as_py())


@dataclass(frozen=True)
class Provenance:
    """Where a section came from: the adapter that read it and the files it read."""

    adapter: str
    adapter_version: str
    bundle: str
    files: tuple[str, ...]
    layout: str = ""


@dataclass(frozen=True)
class ArrayLattice:
    """Which unit columns index the capture array, and the micrometres one index step spans.

    The array indices give the pixel size exactly on any subset of units, however sparse:
    registration fits array (um) -> WSI px and reads the scale off the fit, where a nearest-
    neighbour distance would measure gaps between the units a subset happened to keep.
    Visium (hexagonal): a column step is 50 um (same-row neighbours are 2 columns, 100 um
    apart), a row step 100 * sqrt(3) / 2 um; square lattices (Visium HD bins, ST 1k) step by
    their pitch both ways.
    """

    col: str
    row: str
    col_step_um: float
    row_step_um: float


@dataclass
class Section:
    """One section in its native platform frame, before registration.

    `units` has one row per expression unit with at least `unit_id` (unique str), `x_native`,
    `y_native` (float64, the platform's own frame; x is the column, y the row). Adapters may add
    columns (array_row, array_col, in_tissue, ...). `counts` is a CSR matrix of raw integer
    counts, rows aligned with `units`, columns with `genes` (gene_id, symbol, ensembl_id); dense
    platforms hand a `CountsStore` instead (rows on disk, read back per pair, so the matrix is
    never whole in memory): read rows through `count_rows`.
    `control_counts` holds, per unit, the totals of control probes dropped from `counts`.

    `native_to_wsi` maps native coordinates (homogeneous column vectors) to WSI level-0 pixels;
    None means the native frame already is WSI level-0 pixels. `native_um_per_unit` is the
    micrometres per native unit as the bundle states it (Visium scalefactors, Xenium microns),
    None when the bundle does not say. `pitch_um` is the platform's known centre-to-centre unit
    pitch, used to estimate and cross-check the image's mpp. `array_lattice` names the units'
    array-index columns where the bundle has them (the exact pitch check), else None.
    """

    section_id: str
    platform: str
    units: pd.DataFrame
    counts: sp.csr_matrix | CountsStore
    genes: pd.DataFrame
    wsi_path: Path
    unit_shape: UnitShape
    unit_size_um: float
    pitch_um: float | None
    default_mode: TilingMode
    provenance: Provenance
    native_to_wsi: np.ndarray | None = None
    native_um_per_unit: float | None = None
    control_counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    metadata: dict[str, str] = field(default_factory=dict)
    qc: dict[str, float | int | str | bool] = field(default_factory=dict)
    array_lattice: ArrayLattice | None = None

    def __post_init__(self) -> None:
        validate_section_id(self.section_id)
        missing = [c for c in UNIT_COLUMNS if c not in self.units.columns]
        if missing:
            raise ValueError(f"section {self.section_id}: units table lacks columns {missing}")
        missing = [c for c in GENE_COLUMNS if c not in self.genes.columns]
        if missing:
            raise ValueError(f"section {self.section_id}: gene table lacks columns {missing}")
        if not isinstance(self.counts, CountsStore | sp.csr_matrix | sp.csr_array):
            self.counts = sp.csr_matrix(self.counts)
        if self.counts.shape != (len(self.units), len(self.genes)):
            raise ValueError(
                f"section {self.section_id}: counts shape {self.counts.shape} does not match "
                f"{len(self.units)} units x {len(self.genes)} genes"
            )
        if not np.issubdtype(self.counts.dtype, np.integer):
            raise ValueError(f"section {self.section_id}: counts must be raw integers")
        if isinstance(self.counts, CountsStore):
            pass  # checked row by row as the adapter wrote them
        elif self.counts.nnz and self.counts.data.min() < 0:
            raise ValueError(f"section {self.section_id}: counts must be non-negative")
        if _has_duplicates(self.units["unit_id"]):
            raise ValueError(f"section {self.section_id}: unit ids are not unique")
        if self.genes["gene_id"].duplicated().any():
            raise ValueError(f"section {self.section_id}: gene ids are not unique")
        xy = self.units[["x_native", "y_native"]].to_numpy(dtype=np.float64)
        if not np.isfinite(xy).all():
            raise ValueError(f"section {self.section_id}: unit coordinates must be finite")
        if self.native_to_wsi is not None:
            self.native_to_wsi = np.asarray(self.native_to_wsi, dtype=np.float64)
            if self.native_to_wsi.shape != (3, 3):
                raise ValueError(f"section {self.section_id}: native_to_wsi must be 3x3")
        if self.array_lattice is not None:
            lattice = self.array_lattice
            absent = [c for c in (lattice.col, lattice.row) if c not in self.units.columns]
            if absent:
                raise ValueError(
                    f"section {self.section_id}: array lattice columns {absent} not in units"
                )
            if not (lattice.col_step_um > 0 and lattice.row_step_um > 0):
                raise ValueError(f"section {self.section_id}: array lattice steps must be > 0")
        if len(self.control_counts) and len(self.control_counts) != len(self.units):
            raise ValueError(f"section {self.section_id}: control_counts rows != units")

    @property
    def n_units(self) -> int:
        """Number of expression units."""
        return len(self.units)

    @property
    def n_genes(self) -> int:
        """Number of genes in the section's panel (control probes excluded)."""
        return len(self.genes)

    def count_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The counts of the units at positions `rows`, in that order."""
        if isinstance(self.counts, CountsStore):
            return self.counts.rows(rows)
        return sp.csr_matrix(self.counts[rows])

    def to_anndata(self) -> anndata.AnnData:
        """Units x genes AnnData with raw counts; `obsm['spatial']` in the native frame."""
        import anndata

        obs = self.units.set_index("unit_id", drop=False).copy()
        obs.index = obs.index.astype(str)
        for column in self.control_counts.columns:
            obs[f"control_{column}"] = self.control_counts[column].to_numpy()
        var = self.genes.set_index("gene_id", drop=False).copy()
        var.index = var.index.astype(str)
        counts = self.counts.tocsr() if isinstance(self.counts, CountsStore) else self.counts
        adata = anndata.AnnData(X=counts.astype(np.int32), obs=obs, var=var)
        adata.obsm["spatial"] = self.units[["x_native", "y_native"]].to_numpy(np.float64)
        adata.uns["histmol"] = {
            "section_id": self.section_id,
            "platform": self.platform,
            "wsi_path": str(self.wsi_path),
            "unit_shape": self.unit_shape,
            "unit_size_um": self.unit_size_um,
            "metadata": dict(self.metadata),
            "provenance": {
                "adapter": self.provenance.adapter,
                "adapter_version": self.provenance.adapter_version,
                "bundle": self.provenance.bundle,
                "files": list(self.provenance.files),
                "layout": self.provenance.layout,
            },
        }
        if self.native_to_wsi is not None:
            adata.uns["histmol"]["native_to_wsi"] = self.native_to_wsi.tolist()
        return adata
