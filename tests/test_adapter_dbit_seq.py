"""DBiT-seq adapter: hand-written bundles (ST Pipeline tsv, h5ad + barcode list), corner
landmarks, a synthetic chip end to end, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from adapter_contract import AdapterContract, BundleCase
from gene_space_helpers import truth_columns

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError, RegistrationError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_dbit_seq_bundle
from platform_adapters import dbit_seq

PIXELS = ["1x1", "2x1", "1x2", "3x3"]
GENES = ["ENSMUSG00000000001", "ENSMUSG00000000028"]
COUNTS = np.array([[3, 0], [1, 2], [0, 5], [4, 4]])
ON_TISSUE = ",1x1,2x1,3x3"  # Pixel_identification.m output
# (A, B) index -> WSI px: 20 um pitch at 0.5 um/px = 40 px, chip corner at (100, 200)
TRUE_MATRIX = np.array([[40.0, 0.0, 60.0], [0.0, 40.0, 160.0], [0.0, 0.0, 1.0]])
CORNERS = {"1x1": (1, 1), "50x1": (50, 1), "1x50": (1, 50), "50x50": (50, 50)}
A_BARCODES = {1: "AACGTGAT", 2: "AAACATCG", 3: "ATGCCTAA"}
B_BARCODES = {1: "GTCGTAGA", 2: "GTCTGTCA", 3: "GTGGCCTT"}
CONFIG = BuildConfig(patch_px=64)


def corner_rows(swap: tuple[str, str] | None = None, nudge: float = 0.0) -> list[str]:
    """`spot,x,y` lines of the four corners under TRUE_MATRIX (labels of `swap` exchanged)."""
    lines = ["spot,x,y"]
    for spot, (a, b) in CORNERS.items():
        x, y, _ = TRUE_MATRIX @ np.array([a, b, 1.0])
        label = spot
        if swap and spot in swap:
            label = swap[1] if spot == swap[0] else swap[0]
        lines.append(f"{label},{x + (nudge if spot == '50x50' else 0.0)},{y}")
    return lines


def write_tsv_bundle(
    folder: Path,
    *,
    pixels: list[str] = PIXELS,
    position: bool = True,
    corners: list[str] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t" + "\t".join(GENES)] + [
        p + "\t" + "\t".join(map(str, row)) for p, row in zip(pixels, COUNTS, strict=True)
    ]
    (folder / "dbit_stdata.tsv").write_text("\n".join(lines) + "\n")
    if position:
        (folder / "position.txt").write_text(ON_TISSUE)
    (folder / "corners.csv").write_text("\n".join(corners or corner_rows()) + "\n")
    return folder


def write_h5ad_bundle(folder: Path, *, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ab = [tuple(int(v) for v in p.split("x")) for p in PIXELS]
    names = names or [B_BARCODES[b] + A_BARCODES[a] for a, b in ab]
    var = pd.DataFrame({"gene_ids": GENES}, index=["Gnai3", "Cdc45"])
    anndata.AnnData(
        X=sp.csr_matrix(COUNTS.astype(np.float32)), obs=pd.DataFrame(index=names), var=var
    ).write_h5ad(folder / "dbit.h5ad")
    lines = [f"A{i}\t{s}" for i, s in A_BARCODES.items()] + [
        f"B{i}\t{s}" for i, s in B_BARCODES.items()
    ]
    (folder / "barcode_list.txt").write_text("\n".join(lines) + "\n")
    (folder / "corners.csv").write_text("\n".join(corner_rows()) + "\n")
    return folder


class TestDbitSeqContract(AdapterContract):
    platform = "dbit-seq"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        return write_tsv_bundle(tmp_path / "FFPE-2"), {}


# -- hand-written bundles ----------------------------------------------------------------------


def test_st_pipeline_matrix_with_tissue_positions_and_corners(tmp_path: Path) -> None:
    section = dbit_seq.read(write_tsv_bundle(tmp_path / "b"), wsi="he.tif")
    assert section.units["unit_id"].tolist() == ["1x1", "2x1", "3x3"]  # 1x2 is off tissue
    assert section.units["x_native"].tolist() == [1.0, 2.0, 3.0]  # A is the column
    assert section.units["y_native"].tolist() == [1.0, 1.0, 3.0]  # B is the row
    np.testing.assert_array_equal(section.counts.toarray(), COUNTS[[0, 1, 3]])
    np.testing.assert_allclose(section.native_to_wsi, TRUE_MATRIX, atol=1e-9)
    assert (section.unit_shape, section.unit_size_um, section.pitch_um) == ("square", 10.0, 20.0)
    assert section.native_um_per_unit == 20.0
    assert section.provenance.layout == "st_pipeline_matrix+corners"
    assert section.qc["corner_max_um"] < 1e-9 and section.qc["n_channels"] == 50
    everything = dbit_seq.read(tmp_path / "b", wsi="he.tif", tissue_only=False)
    assert everything.units["unit_id"].tolist() == PIXELS
    assert everything.units["in_tissue"].tolist() == [1, 1, 0, 1]


def test_h5ad_with_barcode_list(tmp_path: Path) -> None:
    section = dbit_seq.read(write_h5ad_bundle(tmp_path / "b"), wsi="he.tif")
    assert section.units["unit_id"].tolist() == PIXELS  # no position file: every pixel
    assert section.genes["gene_id"].tolist() == GENES
    assert section.genes["symbol"].tolist() == ["Gnai3", "Cdc45"]
    np.testing.assert_array_equal(section.counts.toarray(), COUNTS)
    assert section.provenance.layout == "h5ad_barcode_list+corners"


def test_h5ad_barcodes_missing_from_the_list(tmp_path: Path) -> None:
    names = [
        B_BARCODES[1] + A_BARCODES[1],
        B_BARCODES[1] + A_BARCODES[2],
        A_BARCODES[1] + B_BARCODES[2],
        B_BARCODES[3] + A_BARCODES[3],
    ]  # third is A+B
    folder = write_h5ad_bundle(tmp_path / "b", names=names)
    with pytest.raises(BundleError, match=r"dbit.h5ad: only 3 of 4 obs barcodes .*barcode_list"):
        dbit_seq.read(folder, wsi="he.tif")
    section = dbit_seq.read(folder, wsi="he.tif", min_match_rate=0.75)
    assert section.units["unit_id"].tolist() == ["1x1", "2x1", "3x3"]
    (folder / "barcode_list.txt").unlink()
    with pytest.raises(BundleError, match=r"no barcode list \(\*barcode_list\*\)"):
        dbit_seq.read(folder, wsi="he.tif")


def test_swapped_corner_labels_mirror_and_are_refused(tmp_path: Path) -> None:
    folder = write_tsv_bundle(tmp_path / "b", corners=corner_rows(swap=("50x1", "1x50")))
    with pytest.raises(BundleError, match=r"corners.csv: corner landmarks rejected: .*mirrors"):
        dbit_seq.read(folder, wsi="he.tif")
    section = dbit_seq.read(folder, wsi="he.tif", allow_mirror=True)  # a BxA lab convention
    assert np.linalg.det(section.native_to_wsi[:2, :2]) < 0
    assert section.qc["corner_fit_mirrored"] is True


def test_misplaced_corner_and_bad_corner_files(tmp_path: Path) -> None:
    # 4 corners leave 2 degrees of freedom: a corner 3 pitches (60 um) off shows as 15 um
    folder = write_tsv_bundle(tmp_path / "b", corners=corner_rows(nudge=120.0))
    with pytest.raises(BundleError, match=r"corners.csv: corner 50x50 lies 14.8 um from where"):
        dbit_seq.read(folder, wsi="he.tif")
    write_tsv_bundle(folder, corners=corner_rows(swap=("50x1", "50x50")))  # a bow tie
    with pytest.raises(BundleError, match=r"corners.csv: .*mislabelled"):
        dbit_seq.read(folder, wsi="he.tif")
    renamed = ["spot,px_x,y"] + corner_rows()[1:]
    write_tsv_bundle(folder, corners=renamed)
    with pytest.raises(BundleError, match=r"corners.csv: corners file lacks columns \['x'\]"):
        dbit_seq.read(folder, wsi="he.tif")
    write_tsv_bundle(folder, corners=["spot,x,y", "1x1,0,0", "2x2,40,40", "3x3,80,80"])
    with pytest.raises(BundleError, match=r"corners.csv: corner landmarks rejected: .*collinear"):
        dbit_seq.read(folder, wsi="he.tif")


def test_explicit_matrix_wins_and_no_placement_is_refused(tmp_path: Path) -> None:
    folder = write_tsv_bundle(tmp_path / "b", corners=corner_rows(swap=("50x1", "1x50")))
    section = dbit_seq.read(folder, wsi="he.tif", native_to_wsi=TRUE_MATRIX)  # corners unread
    np.testing.assert_array_equal(section.native_to_wsi, TRUE_MATRIX)
    assert section.provenance.layout == "st_pipeline_matrix+explicit"
    (folder / "corners.csv").unlink()
    with pytest.raises(BundleError, match=r"b: no way to place the pixels.*--transform"):
        dbit_seq.read(folder, wsi="he.tif")


def test_pixel_ids_outside_the_grid_and_missing_counts(tmp_path: Path) -> None:
    folder = write_tsv_bundle(tmp_path / "b", pixels=["1x1", "2x1", "101x2", "0x3"])
    with pytest.raises(
        BundleError,
        match=r"dbit_stdata.tsv: pixel ids outside a 100-channel grid: "
        r"\['101x2', '0x3'\]",
    ):
        dbit_seq.read(folder, wsi="he.tif")
    (folder / "dbit_stdata.tsv").unlink()
    with pytest.raises(BundleError, match=r"b: no counts: a DBiT-seq bundle holds one ST"):
        dbit_seq.read(folder, wsi="he.tif")


# -- a synthetic chip end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth, Path]:
    root = tmp_path_factory.mktemp("dbit")
    # the smallest real chip, 50 channels of 10 um, spans 990 um
    slide = make_slide(root / "he.tif", width_um=1040.0, height_um=1040.0, mpp=0.5, seed=14)
    truth = write_dbit_seq_bundle(root / "E10_10um", slide, seed=14, n_genes=60)
    out = root / "corpus"
    build_section(SectionRequest("dbit-seq", truth.bundle, slide.path, "dbit-01"), out, CONFIG)
    return slide, truth, out


def test_synthetic_chip_placed_by_its_corners_exactly(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path],
) -> None:
    _, truth, out = synthetic
    manifest = pd.read_parquet(out / "manifest.parquet")
    units = pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])
    section = pd.read_parquet(out / "sections.parquet").iloc[0]
    on_tissue = np.flatnonzero(truth.in_tissue)
    assert len(units) + section["qc_n_units_dropped_tissue"] == len(on_tissue)
    index = pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids)
    rows = index.loc[units["unit_id"]].to_numpy()
    assert truth.in_tissue[rows].all()
    np.testing.assert_allclose(units["x_wsi_px"], truth.x_wsi_px[rows], atol=1e-6)
    np.testing.assert_allclose(units["y_wsi_px"], truth.y_wsi_px[rows], atol=1e-6)
    # the matrix names genes by id only: resolve them the same way
    column = truth_columns(truth.genes["gene_id"], truth.genes["gene_id"])  # stable idx -> col
    got = np.zeros((len(units), len(truth.genes)), np.int64)
    for i, (genes, values) in enumerate(zip(units["gene_idx"], units["counts"], strict=True)):
        got[i, column.loc[np.asarray(genes)].to_numpy()] = values
    np.testing.assert_array_equal(got, truth.counts[rows].toarray())
    assert section["n_pairs"] == len(units)  # spot mode: one patch per pixel
    assert section["qc_placement"] == "corners" and section["qc_corner_max_um"] < 1e-6
    assert section["mpp_source"] == "embedded" and section["qc_mpp_embedded_vs_pitch"] < 1e-9


def test_h5ad_layout_reads_the_same_chip(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    slide, _, _ = synthetic
    truth = write_dbit_seq_bundle(tmp_path / "h5", slide, layout="h5ad", seed=14, n_genes=60)
    section = dbit_seq.read(truth.bundle, wsi=slide.path)
    rows = (
        pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids)
        .loc[section.units["unit_id"]]
        .to_numpy()
    )
    assert sorted(rows.tolist()) == np.flatnonzero(truth.in_tissue).tolist()
    np.testing.assert_array_equal(section.counts.toarray(), truth.counts[rows].toarray())
    np.testing.assert_allclose(section.native_to_wsi, truth.native_to_wsi, atol=1e-9)


def test_flipped_corners_are_caught_at_build(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    slide, truth, _ = synthetic
    bundle = tmp_path / "bundle"
    shutil.copytree(truth.bundle, bundle)
    corners = pd.read_csv(bundle / "corners.csv")
    corners["spot"] = corners["spot"].str.split("x").map(lambda ab: f"{ab[1]}x{ab[0]}")  # BxA
    corners.to_csv(bundle / "corners.csv", index=False)
    request = SectionRequest("dbit-seq", bundle, slide.path, "flipped")
    with pytest.raises(BundleError, match=r"corners.csv: corner landmarks rejected: .*mirrors"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()
    # --transform places the section itself: the corners file is not consulted
    request = SectionRequest("dbit-seq", bundle, slide.path, "given", truth.transform_path)
    result = build_section(request, tmp_path / "c", CONFIG)
    assert result.n_units == int(truth.in_tissue.sum())


def test_a_wrong_channel_width_fails_the_pitch_check(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    slide, truth, _ = synthetic
    request = SectionRequest(
        "dbit-seq", truth.bundle, slide.path, "wide", options={"channel_um": 50.0}
    )
    with pytest.raises(RegistrationError, match="disagrees"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()


def test_crop_box_follows_the_lab_scripts_2n_minus_1_strips(tmp_path: Path) -> None:
    # Pixel_identification.m (edicliuyang/DBiT-seq_FFPE) cuts the working-region crop, outer
    # edge of channel 1 to outer edge of channel n, into 2n - 1 strips: centre of channel A at
    # x0 + (2A - 1.5) W / (2n - 1). An unrotated synthetic chip: the crop box from its truth.
    slide = make_slide(tmp_path / "he.tif", width_um=1040.0, height_um=1040.0, mpp=0.5, seed=4)
    truth = write_dbit_seq_bundle(tmp_path / "b", slide, seed=4, n_genes=20, rotation_deg=0.0)
    m = truth.native_to_wsi  # (A, B) -> px; channel width = half the step
    half_width = m[0, 0] / 4.0
    x0, y0 = m[0, 0] * 1 + m[0, 2] - half_width, m[1, 1] * 1 + m[1, 2] - half_width
    x1, y1 = m[0, 0] * 50 + m[0, 2] + half_width, m[1, 1] * 50 + m[1, 2] + half_width
    box = f"{x0},{y0},{x1},{y1}"
    section = dbit_seq.read(truth.bundle, wsi=slide.path, crop_box=box)
    np.testing.assert_allclose(section.native_to_wsi, m, atol=1e-9)
    assert section.qc["placement"] == "crop_box_2n-1"
    # W / (2n - 1) per strip, so the equal-division rule puts channel 50 a quarter step off
    equal = dbit_seq.read(truth.bundle, wsi=slide.path, crop_box=box, crop_strips="n")
    a50 = np.array([50.0, 50.0, 1.0])
    off = np.hypot(*((equal.native_to_wsi - m) @ a50)[:2]) / m[0, 0]
    assert 0.3 < off < 0.5  # in pitches, at each axis ~0.25
    np.testing.assert_allclose(
        dbit_seq.crop_box_transform((0, 0, 99, 99), 50) @ [1, 1, 1], [0.5, 0.5, 1.0]
    )
    with pytest.raises(ConfigError, match=r"corners or crop_box, not both"):
        dbit_seq.read(truth.bundle, wsi=slide.path, crop_box=box,
                      corners=truth.bundle / "corners.csv")
