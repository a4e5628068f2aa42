"""Unit tables are built a batch of pairs at a time: the corpus must not depend on the batch."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import histmol.pairs
from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_visium_bundle

# grid mode, 256 um patches: several spots per pair, so batches split between and inside pairs
GRID = BuildConfig(patch_px=512, mode="grid")
SPOT = BuildConfig(patch_px=64)


@pytest.fixture(scope="module")
def visium(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth]:
    root = tmp_path_factory.mktemp("synthetic")
    slide = make_slide(root / "slide.tif", width_um=1400.0, height_um=1200.0, mpp=0.25, seed=5)
    truth = write_visium_bundle(root / "visium", slide, seed=5, n_genes=40)
    return slide, truth


def build(visium: tuple[SyntheticSlide, GroundTruth], out: Path, config: BuildConfig) -> Path:
    slide, truth = visium
    request = SectionRequest("visium", truth.bundle, slide.path, "syn", truth.transform_path)
    build_section(request, out, config)
    return out


def digests(out: Path) -> list[tuple[str, str]]:
    manifest = pd.read_parquet(out / "manifest.parquet")
    return list(zip(manifest["images_sha256"], manifest["units_sha256"], strict=True))


@pytest.mark.parametrize("config", [GRID, SPOT], ids=["grid", "spot"])
def test_corpus_bytes_do_not_depend_on_the_batch_size(
    visium: tuple[SyntheticSlide, GroundTruth],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: BuildConfig,
) -> None:
    reference = build(visium, tmp_path / "default", config)
    units = pd.concat(pq.read_table(reference / path).to_pandas()
                      for path in pd.read_parquet(reference / "manifest.parquet")["units_path"])
    per_pair = units.groupby("pair_index").size()
    if config is GRID:
        assert per_pair.max() >= 3  # pairs larger than the smallest batch below
    for batch_units in (1, 3, 7):  # 1: one pair per batch, what the per-pair code did
        monkeypatch.setattr(histmol.pairs, "BATCH_UNITS", batch_units)
        rebuilt = build(visium, tmp_path / f"batch-{batch_units}", config)
        assert digests(rebuilt) == digests(reference)
