"""End to end on generated bundles with known truth: exact placement, counts, pixels, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from gene_space_helpers import truth_columns
from PIL import Image

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import QCError, RegistrationError, WSIError
from histmol.shards.jpeg import encode_patch
from histmol.shards.shard_reader import ShardReader
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_visium_bundle
from histmol.tiling import patch_window

CONFIG = BuildConfig(patch_px=64)  # 64 px at 0.5 um/px: 32 um patches, small and fast


@pytest.fixture(scope="module")
def visium(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth]:
    root = tmp_path_factory.mktemp("synthetic")
    slide = make_slide(root / "slide.tif", width_um=1400.0, height_um=1200.0, mpp=0.25, seed=3)
    truth = write_visium_bundle(root / "visium", slide, seed=3, n_genes=60)
    return slide, truth


@pytest.fixture(scope="module")
def built(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    slide, truth = visium
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    request = SectionRequest("visium", truth.bundle, slide.path, "syn-01", truth.transform_path)
    build_section(request, out, CONFIG)
    return out


def units_of(out: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(out / "manifest.parquet")
    return pd.concat([pq.read_table(out / path).to_pandas() for path in manifest["units_path"]])


def test_units_land_exactly_where_the_truth_says(
    built: Path, visium: tuple[SyntheticSlide, GroundTruth]
) -> None:
    _, truth = visium
    assert np.linalg.det(truth.native_to_wsi[:2, :2]) < 0  # the bundle frame is mirrored
    units = units_of(built).set_index("unit_id")
    index = pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids.astype(str))
    rows = index.loc[units.index].to_numpy()
    np.testing.assert_allclose(units["x_wsi_px"], truth.x_wsi_px[rows], atol=1e-9)
    np.testing.assert_allclose(units["y_wsi_px"], truth.y_wsi_px[rows], atol=1e-9)
    np.testing.assert_allclose(units["x_um"], truth.x_wsi_px[rows] * 0.25, atol=1e-9)
    section = pd.read_parquet(built / "sections.parquet").iloc[0]
    assert section["mpp_source"] == "embedded" and section["mpp"] == 0.25
    assert bool(section["qc_transform_mirrored"])
    assert section["qc_mpp_scalefactors_vs_pitch"] < 0.01


def test_every_unit_is_kept_or_counted_as_dropped_and_counts_are_exact(
    built: Path, visium: tuple[SyntheticSlide, GroundTruth]
) -> None:
    _, truth = visium
    units = units_of(built)
    section = pd.read_parquet(built / "sections.parquet").iloc[0]
    assert len(units) + section["qc_n_units_dropped_tissue"] == truth.counts.shape[0]
    assert section["n_units"] == len(units) and section["n_pairs"] == len(units)  # spot mode
    # stable gene index -> truth column, resolved as the adapter resolves the features
    truth_column = truth_columns(truth.genes["gene_id"], truth.genes["symbol"])
    index = pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids.astype(str))
    dense = truth.counts.toarray()
    for record in units.head(50).itertuples():
        expected = dense[index[record.unit_id]]
        got = np.zeros_like(expected)
        got[truth_column.loc[np.asarray(record.gene_idx)].to_numpy()] = record.counts
        np.testing.assert_array_equal(got, expected)
    assert units["total_counts"].sum() == dense[index.loc[units["unit_id"]].to_numpy()].sum()


def test_patch_pixels_are_the_resampled_slide(
    built: Path, visium: tuple[SyntheticSlide, GroundTruth]
) -> None:
    slide, _ = visium
    units = units_of(built)
    manifest = pd.read_parquet(built / "manifest.parquet")
    footprint = 64 * 0.5 / 0.25
    with tifffile.TiffFile(slide.path) as tif:
        level1 = tif.pages[1].asarray()  # downsample 2 = exactly the target 0.5 um/px
    with ShardReader(built / manifest["images_path"].iloc[0]) as reader:
        for record in units.head(20).itertuples():
            window = patch_window(record.patch_x0_wsi_px, record.patch_y0_wsi_px, footprint, 64,
                                  "lanczos", 1, 2.0)
            padded = np.full((window.height, window.width, 3), 255, np.uint8)
            ys, xs = max(window.y, 0), max(window.x, 0)
            ye = min(window.y + window.height, level1.shape[0])
            xe = min(window.x + window.width, level1.shape[1])
            padded[ys - window.y:ye - window.y, xs - window.x:xe - window.x] = level1[ys:ye, xs:xe]
            expected = np.asarray(Image.fromarray(padded).resize((64, 64), Image.Resampling.LANCZOS,
                                                                 box=window.box))
            # the stored JPEG is byte for byte the encoding of the direct crop + resample
            assert reader.read_jpeg(record.pair_index) == encode_patch(expected, 90)


def test_wrong_transform_is_caught(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = visium
    swapped = tmp_path / "swapped.csv"
    m = truth.native_to_wsi
    swapped.write_text("\n".join(",".join(str(v) for v in row) for row in m[[1, 0, 2]]))
    request = SectionRequest("visium", truth.bundle, slide.path, "bad", swapped)
    with pytest.raises((RegistrationError, QCError), match="transform"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()


def test_truncated_wsi_names_the_file_and_writes_nothing(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = visium
    broken = tmp_path / "broken.tif"
    data = slide.path.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    request = SectionRequest("visium", truth.bundle, broken, "bad", truth.transform_path)
    with pytest.raises(WSIError, match="broken.tif"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()


def test_missing_scalefactors_names_the_file(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = visium
    bundle = tmp_path / "outs"
    shutil.copytree(truth.bundle, bundle)
    (bundle / "spatial" / "scalefactors_json.json").unlink()
    request = SectionRequest("visium", bundle, slide.path, "bad", truth.transform_path)
    with pytest.raises(Exception, match="scalefactors_json.json"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()


def write_landmarks(path: Path, truth: GroundTruth, rows: list[int], shift_px: float = 0.0) -> Path:
    table = pd.DataFrame({
        "native_x": truth.x_native[rows], "native_y": truth.y_native[rows],
        "wsi_x": truth.x_wsi_px[rows], "wsi_y": truth.y_wsi_px[rows],
    })
    table.loc[0, "wsi_x"] += shift_px
    table.to_csv(path, index=False)
    return path


def test_landmarks_fit_the_transform(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = visium
    rows = list(np.linspace(0, len(truth.unit_ids) - 1, 6).astype(int))
    landmarks = write_landmarks(tmp_path / "pairs.csv", truth, rows)
    request = SectionRequest("visium", truth.bundle, slide.path, "lm", landmarks=landmarks)
    out = tmp_path / "c"
    build_section(request, out, CONFIG)
    units = units_of(out).set_index("unit_id")
    index = pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids.astype(str))
    np.testing.assert_allclose(units["x_wsi_px"], truth.x_wsi_px[index.loc[units.index]], atol=1e-6)
    section = pd.read_parquet(out / "sections.parquet").iloc[0]
    assert section["qc_landmark_pairs"] == 6 and section["qc_landmark_max_um"] < 1e-6


def test_a_misplaced_landmark_fails_with_its_residual(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = visium
    rows = list(np.linspace(0, len(truth.unit_ids) - 1, 6).astype(int))
    landmarks = write_landmarks(tmp_path / "pairs.csv", truth, rows, shift_px=800.0)  # 200 um off
    request = SectionRequest("visium", truth.bundle, slide.path, "lm", landmarks=landmarks)
    with pytest.raises(RegistrationError, match=r"landmark pair \d lies [\d.]+ um from where"):
        build_section(request, tmp_path / "c", CONFIG)
