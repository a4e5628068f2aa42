"""Open-ST adapter: hand-written aligned h5ads, a synthetic section end to end, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from adapter_contract import AdapterContract, BundleCase
from anndata.io import write_elem
from binned_truth import assert_binned_corpus_exact
from PIL import Image

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_open_st_bundle
from platform_adapters import open_st

# aligned positions as Open-ST stores them: (row, col) in a 48 x 120 px image
ROWS_COLS = np.array([[4, 2], [10, 15], [3, 16], [40, 40], [30, 100]], dtype=np.float64)
COUNTS = np.array([[2, 0, 1], [1, 3, 0], [0, 4, 0], [5, 0, 0], [0, 1, 6]])
GENES = ["Gapdh", "Actb", "Mbp"]
IDS = ["ENSMUSG00000057666", "ENSMUSG00000029580", "ENSMUSG00000041607"]
# 0.5 um/px, 8 um = 16 px bins, in (row, col) order: c0_r0 (spots 1, 2), c1_r0, c6_r1, c2_r2
EXPECTED = [[3, 3, 1], [0, 4, 0], [0, 1, 6], [5, 0, 0]]
CONFIG = BuildConfig(patch_px=64)


def write_h5ad(
    path: Path,
    *,
    positions: np.ndarray = ROWS_COLS,
    key: str = "fine",
    normalised_x: bool = False,
    counts_layer: bool = False,
    image: bool = True,
) -> Path:
    """A small aligned h5ad as `openst pairwise_aligner --save-image-in-h5` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = sp.csr_matrix(COUNTS.astype(np.float32))
    x = sp.csr_matrix(raw.multiply(1.0 / raw.sum(axis=1))) if normalised_x else raw
    obs = pd.DataFrame(
        {"tile_id": pd.Categorical(["t1", "t1", "t2", "t2", "t2"])},
        index=[f"bc{i}" for i in range(len(positions))],
    )
    var = pd.DataFrame({"gene_ids": IDS}, index=GENES)
    adata = anndata.AnnData(X=x, obs=obs, var=var)
    if counts_layer:
        adata.layers["counts"] = raw
    adata.obsm["spatial"] = np.column_stack([positions[:, 1], positions[:, 0]]) * 0.5 + 100.0
    adata.obsm[f"spatial_pairwise_aligned_{key}"] = positions
    if image:
        picture = np.zeros((48, 120, 3), np.uint8)
        adata.uns["spatial_pairwise_aligned"] = {"staining_image_transformed": picture}
    adata.write_h5ad(path)
    return path


class TestOpenSTContract(AdapterContract):
    platform = "open-st"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        write_h5ad(tmp_path / "sample_1" / "sample_1_stitched_spots_aligned.h5ad")
        return tmp_path / "sample_1", {"um_per_px": 0.5}


# -- hand-written h5ads ------------------------------------------------------------------------


def test_spots_are_binned_exactly_in_aligned_pixels(tmp_path: Path) -> None:
    write_h5ad(tmp_path / "a.h5ad")
    section = open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)
    assert section.units["unit_id"].tolist() == ["c0_r0", "c1_r0", "c6_r1", "c2_r2"]
    assert section.units["x_native"].tolist() == [8.0, 24.0, 104.0, 40.0]  # column = x
    assert section.units["y_native"].tolist() == [8.0, 8.0, 24.0, 40.0]  # row = y
    assert section.genes["gene_id"].tolist() == IDS
    assert section.genes["symbol"].tolist() == GENES
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED)
    assert section.qc["spatial_key"] == "spatial_pairwise_aligned_fine"
    assert section.qc["um_per_px_from_alignment"] == pytest.approx(0.5)
    assert (section.qc["aligned_image_height"], section.qc["aligned_image_width"]) == (48, 120)


def test_raw_counts_layer_and_coarse_alignment(tmp_path: Path) -> None:
    write_h5ad(tmp_path / "a.h5ad", normalised_x=True, counts_layer=True, key="coarse")
    section = open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED)
    assert section.qc["counts_source"] == "layers/counts"
    assert section.qc["spatial_key"] == "spatial_pairwise_aligned_coarse"


def test_normalised_counts_are_refused(tmp_path: Path) -> None:
    write_h5ad(tmp_path / "a.h5ad", normalised_x=True)
    message = r"a.h5ad: unit row \d+, feature column \d+: count \S+ is not an integer"
    with pytest.raises(BundleError, match=message):
        open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)


def test_spots_outside_the_image_and_swapped_columns(tmp_path: Path) -> None:
    write_h5ad(tmp_path / "s" / "a.h5ad", positions=ROWS_COLS[:, ::-1].copy())
    with pytest.raises(BundleError, match=r"a.h5ad: only 80.00% of the spots .*look swapped"):
        open_st.read(tmp_path / "s", wsi="he.tif", um_per_px=0.5)
    beyond = ROWS_COLS.copy()
    beyond[4] = [60, 100]  # row 60 is past the 48 px image
    write_h5ad(tmp_path / "o" / "a.h5ad", positions=beyond)
    with pytest.raises(BundleError, match=r"only 80.00% .*min_match_rate 90.00%\)\.$"):
        open_st.read(tmp_path / "o", wsi="he.tif", um_per_px=0.5)
    section = open_st.read(tmp_path / "o", wsi="he.tif", um_per_px=0.5, min_match_rate=0.8)
    assert section.qc["n_spots_outside_image"] == 1
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED[:2] + EXPECTED[3:])


def test_unaligned_missing_and_ambiguous_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no \*.h5ad"):
        open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)
    write_h5ad(tmp_path / "a.h5ad", key="manual")
    with pytest.raises(BundleError, match=r"a.h5ad: no aligned positions: obsm lacks .*fine"):
        open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)
    section = open_st.read(
        tmp_path, wsi="he.tif", um_per_px=0.5, spatial_key="spatial_pairwise_aligned_manual"
    )
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED)
    write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(BundleError, match=r"several h5ad files \['a.h5ad', 'b.h5ad'\]"):
        open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)
    (tmp_path / "b.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(BundleError, match="b.h5ad: cannot open as HDF5"):
        open_st.read(tmp_path, wsi="he.tif", h5ad=tmp_path / "b.h5ad", um_per_px=0.5)


def test_positions_and_counts_of_different_spots(tmp_path: Path) -> None:
    path = write_h5ad(tmp_path / "a.h5ad")
    with h5py.File(path, "r+") as handle:  # aligned positions for 4 of the 5 spots
        del handle["obsm/spatial_pairwise_aligned_fine"]
        write_elem(handle["obsm"], "spatial_pairwise_aligned_fine", ROWS_COLS[:4])
    with pytest.raises(BundleError, match=r"a.h5ad: obsm/spatial has shape \(5, 2\), expected"):
        open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)
    with h5py.File(path, "r+") as handle:
        del handle["obsm/spatial"]
    with pytest.raises(BundleError, match=r"a.h5ad: X has 5 rows but the aligned positions 4"):
        open_st.read(tmp_path, wsi="he.tif", um_per_px=0.5)


def test_pixel_size_falls_back_to_the_alignment_scale(tmp_path: Path) -> None:
    write_h5ad(tmp_path / "a.h5ad", image=False)
    png = tmp_path / "he.png"  # a PNG states no pixel size
    Image.new("RGB", (120, 48), "white").save(png)
    section = open_st.read(tmp_path, wsi=png)
    assert section.qc["um_per_px_source"] == "alignment"
    assert section.qc["um_per_px"] == pytest.approx(0.5)
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED)


# -- a synthetic section end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth, Path]:
    root = tmp_path_factory.mktemp("openst")
    slide = make_slide(root / "he.tif", width_um=720.0, height_um=400.0, mpp=0.5, seed=13)
    truth = write_open_st_bundle(root / "sample", slide, seed=13, n_genes=60)
    out = root / "corpus"
    build_section(SectionRequest("open-st", truth.bundle, slide.path, "openst-01"), out, CONFIG)
    return slide, truth, out


def test_synthetic_section_counts_and_coordinates_are_exact(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path],
) -> None:
    slide, truth, out = synthetic
    bin_px = 8.0 / slide.mpp
    section = assert_binned_corpus_exact(truth, out, bin_px)
    assert section["qc_spatial_key"] == "spatial_pairwise_aligned_fine"
    assert section["qc_um_per_px_from_alignment"] == pytest.approx(slide.mpp)
    assert section["mpp_source"] == "embedded"


def test_positions_stored_as_xy_are_caught(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    slide, truth, _ = synthetic
    bundle = tmp_path / "sample"
    bundle.mkdir()
    copy = bundle / Path(str(truth.extra["h5ad"])).name
    shutil.copy(Path(str(truth.extra["h5ad"])), copy)
    with h5py.File(copy, "r+") as handle:  # (x, y) written where Open-ST stores (row, col)
        fine = handle["obsm/spatial_pairwise_aligned_fine"]
        fine[...] = fine[()][:, ::-1]
    request = SectionRequest("open-st", bundle, slide.path, "swapped")
    with pytest.raises(BundleError, match=r"aligned.h5ad: only .* the columns look swapped"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()
