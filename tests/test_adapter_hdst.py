"""HDST adapter: hand-written SCP420-style tables, a synthetic section end to end, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from adapter_contract import AdapterContract, BundleCase
from binned_truth import assert_binned_corpus_exact
from PIL import Image

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError, WSIError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_hdst_bundle
from platform_adapters import hdst

# bead -> (spot_px_x, spot_px_y): X grows with x, Y with y, as the HDST alignment lays them.
BEADS = {"1x1": (10, 10), "2x1": (15, 10), "1x2": (12, 14), "3x1": (20, 10), "3x3": (22, 18)}
COUNTS = [
    ("1x1", "Gapdh", 2),
    ("1x1", "Actb", 1),
    ("2x1", "Gapdh", 3),
    ("3x1", "Actb", 4),
    ("3x3", "Gapdh", 1),
    ("3x3", "Mbp", 5),
]
# 0.5 um/px, 8 um bins = 16 px: c0_r0 holds 1x1 and 2x1, c1_r0 3x1, c1_r1 3x3
EXPECTED = [[5, 1, 0], [0, 4, 0], [1, 0, 5]]
CONFIG = BuildConfig(patch_px=64)


def write_bundle(
    folder: Path,
    *,
    counts: list[tuple[str, str, int]] = COUNTS,
    beads: dict[str, tuple[int, int]] | None = None,
    positions: bool = True,
    count_pixels: dict[str, tuple[int, int]] | None = None,
    header: tuple[str, ...] = ("bc", "spot_px_x", "spot_px_y", "gene", "count"),
) -> Path:
    """`S1_HDST_red_ut.tsv` (long counts) and, optionally, the barcodes-under-tissue table."""
    folder.mkdir(parents=True, exist_ok=True)
    beads = BEADS if beads is None else beads
    pixels = beads if count_pixels is None else count_pixels
    lines = ["\t".join(header)]
    for bc, gene, count in counts:
        x, y = pixels.get(bc, (999, 999))
        row = {"bc": bc, "gene": gene, "count": count, "spot_px_x": x, "spot_px_y": y}
        lines.append("\t".join(str(row.get(h, row.get(h.replace("umi_", ""), ""))) for h in header))
    (folder / "S1_HDST_red_ut.tsv").write_text("\n".join(lines) + "\n")
    if positions:
        rows = [f"{bc}\t{x}\t{y}\tregion_{i % 2}" for i, (bc, (x, y)) in enumerate(beads.items())]
        (folder / "S1_barcodes_under_tissue_annot.tsv").write_text(
            "bc\tspot_px_x\tspot_px_y\tannotation_region\n" + "\n".join(rows) + "\n"
        )
    return folder


class TestHdstContract(AdapterContract):
    platform = "hdst"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        return write_bundle(tmp_path / "CN24_D1"), {"um_per_px": 0.5}


# -- hand-written tables -----------------------------------------------------------------------


def test_beads_are_binned_exactly_in_pixel_coordinates(tmp_path: Path) -> None:
    section = hdst.read(write_bundle(tmp_path / "s"), wsi="he.png", um_per_px=0.5)
    assert section.units["unit_id"].tolist() == ["c0_r0", "c1_r0", "c1_r1"]
    assert section.units["x_native"].tolist() == [8.0, 24.0, 24.0]  # H&E px
    assert section.units["y_native"].tolist() == [8.0, 8.0, 24.0]
    assert section.genes["feature"].tolist() == ["Gapdh", "Actb", "Mbp"]
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED)
    assert section.native_to_wsi is None and section.native_um_per_unit == 0.5
    assert section.qc["um_per_px_source"] == "user" and section.qc["bead_match_rate"] == 1.0
    assert section.qc["bead_step_x_um"] == pytest.approx(2.5, abs=0.3)
    assert section.provenance.layout == "scp420_red_ut+barcodes_under_tissue"


def test_counts_alone_carry_the_pixels(tmp_path: Path) -> None:
    section = hdst.read(
        write_bundle(tmp_path / "s", positions=False), wsi="he.png", um_per_px=0.5, bin_um=16.0
    )
    assert section.units["unit_id"].tolist() == ["c0_r0"]  # one 32 px bin holds all beads
    np.testing.assert_array_equal(section.counts.toarray(), [[6, 5, 5]])
    with pytest.raises(ConfigError, match="um_per_px"):
        hdst.read(tmp_path / "s", wsi="he.png", um_per_px=0.0)


def test_beads_missing_from_the_positions_table(tmp_path: Path) -> None:
    counts = COUNTS + [("9x9", "Gapdh", 7)]
    folder = write_bundle(tmp_path / "s", counts=counts)
    with pytest.raises(BundleError, match=r"red_ut.tsv: only 4 of its 5 beads .*under_tissue"):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)
    section = hdst.read(folder, wsi="he.png", um_per_px=0.5, min_match_rate=0.8)
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED)  # 9x9 dropped
    assert section.qc["bead_match_rate"] == 0.8


def test_pixels_that_disagree_between_files(tmp_path: Path) -> None:
    moved = {**BEADS, "3x1": (40, 10)}
    folder = write_bundle(tmp_path / "s", count_pixels=moved)
    with pytest.raises(BundleError, match=r"red_ut.tsv: 1 rows give a bead other pixels .*3x1"):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)


def test_swapped_pixel_columns_are_refused(tmp_path: Path) -> None:
    swapped = {bc: (y, x) for bc, (x, y) in BEADS.items()}  # x written as y and y as x
    folder = write_bundle(tmp_path / "s", positions=False, count_pixels=swapped)
    with pytest.raises(BundleError, match=r"red_ut.tsv: spot_px_x / spot_px_y run against"):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)
    folder = write_bundle(tmp_path / "p", beads=swapped)
    with pytest.raises(BundleError, match=r"barcodes_under_tissue_annot.tsv: .*look swapped"):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)


def test_missing_and_renamed_columns_and_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no counts table found; looked for \*red_ut\*"):
        hdst.read(tmp_path, wsi="he.png", um_per_px=0.5)
    header = ("bc", "spot_px_x", "spot_px_y", "gene", "umi_count")
    folder = write_bundle(tmp_path / "s", header=header)
    with pytest.raises(BundleError, match=r"red_ut.tsv: counts table lacks columns \['count'\]"):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)
    folder = write_bundle(tmp_path / "t", positions=False, header=("bc", "gene", "count"))
    with pytest.raises(BundleError, match=r"lacks columns \['spot_px_x', 'spot_px_y'\].*no bead"):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)
    folder = write_bundle(tmp_path / "u")
    table = folder / "S1_barcodes_under_tissue_annot.tsv"
    table.write_text(table.read_text().replace("spot_px_x", "px_x"))
    with pytest.raises(BundleError, match=r"annot.tsv: bead positions table lacks .*spot_px_x"):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)
    folder = write_bundle(tmp_path / "v", counts=[("1x1", "Gapdh", 2.5)])  # type: ignore[list-item]
    message = r"red_ut.tsv: line \d+ \(count\): count 2.5 is not an integer"
    with pytest.raises(BundleError, match=message):
        hdst.read(folder, wsi="he.png", um_per_px=0.5)


def test_an_image_without_pixel_size_needs_um_per_px(tmp_path: Path) -> None:
    folder = write_bundle(tmp_path / "s")
    image = tmp_path / "S1_HE.png"
    Image.new("RGB", (64, 48), "white").save(image)
    with pytest.raises(WSIError, match=r"S1_HE.png: states no usable pixel size.*um_per_px"):
        hdst.read(folder, wsi=image)


# -- a synthetic section end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth, Path]:
    root = tmp_path_factory.mktemp("hdst")
    slide = make_slide(root / "he.tif", width_um=600.0, height_um=520.0, mpp=0.5, seed=12)
    truth = write_hdst_bundle(root / "CN24_D1", slide, seed=12, n_genes=60)
    out = root / "corpus"
    build_section(SectionRequest("hdst", truth.bundle, slide.path, "hdst-01"), out, CONFIG)
    return slide, truth, out


def test_synthetic_section_counts_and_coordinates_are_exact(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path],
) -> None:
    slide, truth, out = synthetic
    bin_px = 8.0 / slide.mpp
    section = assert_binned_corpus_exact(truth, out, bin_px)
    assert section["qc_um_per_px_source"] == "embedded"
    assert section["qc_bead_step_x_um"] == pytest.approx(truth.extra["pitch_um"], rel=0.02)
    assert section["mpp_source"] == "embedded" and section["qc_mpp_embedded_vs_pitch"] < 1e-9


def test_a_wrong_pixel_size_fails_the_pitch_check(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    slide, truth, _ = synthetic
    request = SectionRequest("hdst", truth.bundle, slide.path, "bad", options={"um_per_px": 0.65})
    with pytest.raises(Exception, match="disagrees"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()
