"""The contract every platform adapter satisfies; each adapter's tests subclass `AdapterContract`.

A subclass sets `platform` and provides the `bundle` fixture: (bundle path, extra keyword
arguments for `read`) of a small valid bundle. The class is not collected by itself (its name does
not start with "Test").
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histmol.counts_store import CountsStore
from histmol.errors import BundleError, ConfigError
from histmol.genes import control_category
from histmol.section import SECTION_ID_PATTERN, Section
from platform_adapters import get_platform, load_reader

COMMON_KEYWORDS = ("wsi", "section_id", "metadata", "min_match_rate", "native_to_wsi")

BundleCase = tuple[Path, dict[str, Any]]


def tree_digest(folder: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file under `folder`: proof that nothing was written."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest[str(path.relative_to(folder))] = (
                stat.st_size,
                stat.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return digest


class AdapterContract:
    """Section invariants and API shape shared by all adapters."""

    platform: ClassVar[str]

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def module(self) -> ModuleType:
        return inspect.getmodule(load_reader(self.platform))  # type: ignore[return-value]

    def read(self, case: BundleCase, **overrides: Any) -> Section:
        bundle, kwargs = case
        kwargs = {"wsi": bundle / "he.tif", **kwargs, **overrides}
        return load_reader(self.platform)(bundle, **kwargs)

    # -- API shape ---------------------------------------------------------------------------
    def test_module_constants(self) -> None:
        assert self.module.PLATFORM == self.platform
        assert self.module.ADAPTER_VERSION == "1"

    def test_read_signature(self) -> None:
        params = list(inspect.signature(self.module.read).parameters.values())
        assert params[0].name == "bundle"
        assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
        names = [p.name for p in params]
        for keyword in COMMON_KEYWORDS:
            assert keyword in names
        for param in params:
            assert not isinstance(param.default, list | dict | set), f"mutable default {param.name}"
        assert self.module.read.__doc__

    # -- Section invariants ------------------------------------------------------------------
    def test_section_invariants(self, bundle: BundleCase) -> None:
        section = self.read(bundle)
        spec = get_platform(self.platform)
        assert SECTION_ID_PATTERN.fullmatch(section.section_id)
        assert section.platform == self.platform
        assert (section.unit_shape, section.unit_size_um) == (spec.unit_shape, spec.unit_size_um)
        # an adapter may withhold the pitch for an array layout whose pitch is not documented
        assert section.pitch_um in (spec.pitch_um, None)
        assert section.default_mode == spec.default_mode
        assert section.provenance.adapter == self.platform
        assert section.provenance.adapter_version == "1"
        assert section.provenance.files and all(Path(f).exists() for f in section.provenance.files)
        assert section.n_units > 0 and section.n_genes > 0
        units = section.units
        assert units["unit_id"].is_unique
        assert units["x_native"].dtype == np.float64 and units["y_native"].dtype == np.float64
        assert np.isfinite(units[["x_native", "y_native"]].to_numpy()).all()
        # dense platforms keep their rows on disk; either way the rows read back as int32 CSR
        counts = section.count_rows(np.arange(section.n_units))
        assert isinstance(section.counts, sp.csr_matrix | CountsStore)
        assert sp.isspmatrix_csr(counts) and counts.dtype == np.int32
        assert section.counts.shape == counts.shape == (section.n_units, section.n_genes)
        assert counts.nnz == 0 or counts.data.min() >= 0
        assert int(section.counts.sum()) == int(counts.sum())
        assert section.genes["gene_id"].is_unique
        assert section.genes["symbol"].map(control_category).isna().all()
        if len(section.control_counts):
            assert len(section.control_counts) == section.n_units
        assert isinstance(section.wsi_path, Path)
        assert section.native_um_per_unit is None or section.native_um_per_unit > 0
        if section.native_to_wsi is not None:
            assert section.native_to_wsi.shape == (3, 3)
        assert section.to_anndata().shape == (section.n_units, section.n_genes)

    def test_never_writes_to_its_input(self, bundle: BundleCase) -> None:
        before = tree_digest(bundle[0])
        self.read(bundle)
        assert tree_digest(bundle[0]) == before

    def test_metadata_and_section_id(self, bundle: BundleCase) -> None:
        section = self.read(bundle, section_id="my-section.1", metadata={"tissue": "brain"})
        assert section.section_id == "my-section.1"
        assert section.metadata == {"tissue": "brain"}
        with pytest.raises(ConfigError):
            self.read(bundle, section_id="Not A Slug/..")

    def test_explicit_native_to_wsi_wins(self, bundle: BundleCase) -> None:
        matrix = np.array([[2.0, 0.0, 5.0], [0.0, 2.0, 7.0], [0.0, 0.0, 1.0]])
        section = self.read(bundle, native_to_wsi=matrix)
        np.testing.assert_array_equal(section.native_to_wsi, matrix)
        with pytest.raises(ConfigError):
            self.read(bundle, native_to_wsi=np.eye(2))

    def test_min_match_rate_is_validated(self, bundle: BundleCase) -> None:
        with pytest.raises(ConfigError):
            self.read(bundle, min_match_rate=1.5)

    def test_missing_bundle_is_named(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope"
        with pytest.raises(BundleError, match=str(missing)):
            load_reader(self.platform)(missing, wsi=tmp_path / "he.tif")

    def test_unit_table_round_trips(self, bundle: BundleCase) -> None:
        section = self.read(bundle)
        adata = section.to_anndata()
        np.testing.assert_array_equal(
            adata.obsm["spatial"], section.units[["x_native", "y_native"]].to_numpy()
        )
        assert isinstance(section.units, pd.DataFrame)
        assert os.fspath(section.wsi_path)
