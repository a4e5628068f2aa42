"""Per-section QC figures: files, byte identity, the images they draw on, and true-size units."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from qc_corpus import QcCorpus, shared_figures, shared_qc_corpus
from typer.testing import CliRunner

from histmol.build import SectionRequest, build_section
from histmol.cli import app
from histmol.config import BuildConfig
from histmol.errors import ConfigError, CorpusError
from histmol.qc import figures as figures_module
from histmol.qc import section_data
from histmol.qc.figures import FIGURE_NAMES, overview_figure, qc_title, write_section_figures
from histmol.qc.measures import (
    UnitPixels,
    blend_units,
    mpp_check,
    neighbour_distances_um,
    paint_units,
    zoom_pair,
)
from histmol.qc.section_data import load_section, patch_background, wsi_background
from histmol.shards.atomic import atomic_write_parquet
from histmol.shards.corpus_tables import sections_table
from histmol.shards.shard_reader import ShardReader
from histmol.validate import validate_corpus
from histmol.wsi import open_wsi


@pytest.fixture(scope="session")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_figures(tmp_path_factory)


def test_figures_are_written_and_byte_identical(
    qc: QcCorpus, figures: Path, tmp_path: Path
) -> None:
    names = [f"{name}.png" for name in FIGURE_NAMES]
    for section_id in ("crc-01", "st-01"):  # crc-01 drawn on the WSI, st-01 on its patches
        assert sorted(p.name for p in (figures / section_id).iterdir()) == sorted(names)
    sizes = {}
    for section_id in ("crc-01", "st-01"):
        for name in ("zoom", "thumbnail"):
            with Image.open(figures / section_id / f"{name}.png") as image:
                assert image.format == "PNG"
                sizes[section_id, name] = image.size
    assert sizes["crc-01", "zoom"] == (1320, 726)  # the WSI crop beside the stored patch
    assert sizes["st-01", "zoom"] == (715, 726)  # no WSI: the stored patch alone
    assert sizes["crc-01", "thumbnail"] == sizes["st-01", "thumbnail"] == (360, 308)
    again = write_section_figures(qc.root, "crc-01", tmp_path, slide=qc.slide)
    assert [p.name for p in again] == names
    assert [p.read_bytes() for p in again] == [(figures / "crc-01" / n).read_bytes() for n in names]


def test_a_slide_of_another_size_is_refused(qc: QcCorpus, tmp_path: Path) -> None:
    other = qc.root.parent / "st-coarse" / "coarse.jpg"
    with pytest.raises(
        ConfigError,
        match=r"coarse.jpg: the image is 1400 x 1200 px but section "
        r"'crc-01' was built on 'slide.tif', 2800 x 2400 px",
    ):
        write_section_figures(qc.root, "crc-01", tmp_path, slide=other)


def test_failed_and_unknown_sections_are_errors(qc: QcCorpus, tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"section 'bad-01' is failed: .*too coarse"):
        write_section_figures(qc.root, "bad-01", tmp_path)
    with pytest.raises(CorpusError, match=r"no section 'nope' \(sections: bad-01, crc-01, crc-02"):
        load_section(qc.root, "nope")


def test_loaded_units_and_counts_match_the_parts(qc: QcCorpus) -> None:
    section = load_section(qc.root, "crc-02", counts=True)
    units = pq.read_table(qc.root / "shards" / "crc-02" / "part-00000.parquet").to_pandas()
    assert len(section.units) == len(units) == 114 and section.pairs().shape[0] == 86
    assert section.units["unit_id"].tolist() == units["unit_id"].tolist()
    vocab = pq.read_table(qc.root / "genes.parquet").column("index").to_numpy()
    # columns are genes.parquet rows; units hold stable gene indices
    assert section.counts is not None and section.counts.shape == (114, len(vocab))
    for i in (0, 57, 113):
        row = section.counts[i]
        assert vocab[row.indices].tolist() == units["gene_idx"][i].tolist()
        assert row.data.tolist() == units["counts"][i].tolist()
    assert np.array_equal(np.asarray(section.counts.sum(axis=1)).ravel(), units["total_counts"])
    assert section.units["n_genes_detected"].tolist() == [len(g) for g in units["gene_idx"]]


def test_wsi_background_is_the_same_in_any_band_size(
    qc: QcCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_wsi(qc.slide) as slide:
        whole = wsi_background(slide, 4.0)
        monkeypatch.setattr(section_data, "BAND_SOURCE_PX", 5_000)  # 1-2 output rows per band
        banded = wsi_background(slide, 4.0)
        reference, scale = slide.thumbnail(700)
    assert whole.image.shape == (600, 700, 3) and (whole.downsample_x, whole.downsample_y) == (
        4.0,
        4.0,
    )
    assert np.array_equal(whole.image, banded.image)
    assert scale == 4.0 and np.abs(whole.image.astype(int) - reference.astype(int)).max() <= 1


def test_patch_mosaic_at_full_resolution_holds_the_stored_patches(qc: QcCorpus) -> None:
    section = load_section(qc.root, "crc-02")  # grid mode: patches tile without overlap
    mosaic = patch_background(section, 1.0)
    assert mosaic.image.shape == (2400, 2800, 3) and mosaic.source == "patches"
    pairs = section.pairs()
    with ShardReader(qc.root / "shards" / "crc-02" / "part-00000.zarr") as reader:
        for pair in (0, 40, 85):
            x0, y0 = int(pairs["x0"][pair]), int(pairs["y0"][pair])
            w, h = min(224, 2800 - x0), min(224, 2400 - y0)  # a patch may cross the slide's edge
            assert np.array_equal(
                mosaic.image[y0 : y0 + h, x0 : x0 + w], reader.read_patch(pair)[:h, :w]
            )


def test_paint_units_covers_the_true_footprint() -> None:
    values = np.array([7.0, 9.0])
    circles = paint_units(
        (20, 20), (1.0, 1.0), np.array([5.5, 14.5]), np.array([5.5, 5.5]), 5.0, "circle", values
    )
    # a disc of diameter 5 px centred on pixel (5, 5): offsets with dx^2 + dy^2 <= 2.5^2
    assert int((circles == 7.0).sum()) == 21 and int((circles == 9.0).sum()) == 21
    assert circles[5, 5] == 7.0 and circles[5, 3] == 7.0 and np.isnan(circles[3, 3])
    squares = paint_units(
        (20, 20), (2.0, 2.0), np.array([10.0]), np.array([10.0]), 8.0, "square", np.array([1.0])
    )
    assert np.array_equal(np.argwhere(squares == 1.0).min(0), [3, 3])
    assert np.array_equal(np.argwhere(squares == 1.0).max(0), [7, 7])
    tiny = paint_units(
        (4, 4), (10.0, 10.0), np.array([25.0]), np.array([5.0]), 1.0, "circle", np.array([3.0])
    )
    assert np.argwhere(~np.isnan(tiny)).tolist() == [[0, 2]]  # still visible: its centre pixel
    overlap = paint_units(
        (10, 10),
        (1.0, 1.0),
        np.array([5.0, 5.0]),
        np.array([5.0, 5.0]),
        3.0,
        "square",
        np.array([1.0, 2.0]),
    )
    assert set(np.unique(overlap[~np.isnan(overlap)])) == {2.0}  # the later unit wins


def test_blend_units_colours_each_footprint_then_box_averages() -> None:
    image = np.full((8, 8, 3), 200, np.uint8)
    units = paint_units(
        (8, 8), (1.0, 1.0), np.array([1.0, 5.0]), np.array([1.0, 5.0]), 2.0, "square",
        np.array([0.0, 1.0]),
    )
    colours = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    pixels = UnitPixels.of(units)
    assert pixels.shape == (8, 8) and len(pixels.index) == 2 * 9  # two 3 x 3 squares
    full = blend_units(image, pixels, colours, 0.75, 8)
    assert full.shape == (8, 8, 3) and full.dtype == np.uint8
    assert full[1, 1].tolist() == [241, 50, 50]  # 0.75 * red + 0.25 * grey 200, rounded
    assert full[5, 5].tolist() == [50, 50, 241]
    assert full[7, 0].tolist() == [200, 200, 200]  # off the units: the slide unchanged
    assert np.array_equal(image, np.full((8, 8, 3), 200, np.uint8))  # the input is kept
    half = blend_units(image, pixels, colours, 0.75, 4)
    assert half.shape == (4, 4, 3)
    assert half[0, 0].tolist() == [241, 50, 50]  # a 2 x 2 block inside unit 0: its colour
    assert half[3, 0].tolist() == [200, 200, 200]


def test_registration_measures_of_a_visium_section(qc: QcCorpus) -> None:
    section = load_section(qc.root, "crc-01")
    distances = neighbour_distances_um(section)
    assert np.median(distances) == pytest.approx(100.0, rel=0.005)  # the Visium pitch
    check = mpp_check(section)
    assert set(check.candidates) == {"embedded", "scalefactors", "estimated_from_pitch"}
    assert check.source == "embedded" and check.resolved == 0.5 and check.tolerance == 0.05
    assert abs(check.disagreement("embedded")) < 0.005
    pair = zoom_pair(section)
    centres = section.pairs()[["x0", "y0"]].to_numpy() + section.footprint_px / 2
    median = np.median(section.units[["x_wsi_px", "y_wsi_px"]].to_numpy(), axis=0)
    assert pair == int(np.argmin(((centres - median) ** 2).sum(1)))


def red_pixels(root: Path, tmp_path: Path) -> int:
    section = load_section(root, "crc-02")
    figure = overview_figure(section, patch_background(section, 2.0), None)
    figure.savefig(tmp_path / "overview.png")
    rgb = np.asarray(Image.open(tmp_path / "overview.png").convert("RGB")).astype(int)
    return int(((rgb[..., 0] - rgb[..., 1] > 90) & (rgb[..., 0] - rgb[..., 2] > 70)).sum())


def test_dropped_patches_are_recorded_and_marked(qc: QcCorpus, tmp_path: Path) -> None:
    root = qc.copy(tmp_path / "corpus")
    section = load_section(root, "crc-02")
    dropped = section.dropped_patches()
    assert dropped is not None and len(dropped) == section.row["qc_n_pairs_dropped_tissue"] > 0
    with_marks = red_pixels(root, tmp_path)
    records = pq.read_table(root / "sections.parquet").to_pylist()
    for record in records:
        if record["section_id"] == "crc-02":
            record["dropped_patch_x0_wsi_px"] = []
            record["dropped_patch_y0_wsi_px"] = []
    atomic_write_parquet(root / "sections.parquet", sections_table(records))
    assert len(load_section(root, "crc-02").dropped_patches()) == 0
    assert with_marks > red_pixels(root, tmp_path) + 500


def test_cli_qc_draws_every_committed_section(
    qc: QcCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def record(
        corpus: Path, section_id: str, out: Path, *, slide: Path | None, **genes: object
    ) -> list[Path]:
        assert genes == {"genes": None, "n_genes": 3}
        calls.append((corpus, section_id, out, slide))
        return [out / section_id / "overview.png"]

    monkeypatch.setattr(figures_module, "write_section_figures", record)
    result = CliRunner().invoke(app, ["qc", str(qc.root)])
    assert result.exit_code == 0, result.output
    assert calls == [(qc.root, sid, qc.root / "qc", None) for sid in ("crc-01", "crc-02", "st-01")]
    calls.clear()
    result = CliRunner().invoke(
        app,
        ["qc", str(qc.root), "--section", "crc-02", "--out", str(tmp_path), "--wsi", str(qc.slide)],
    )
    assert result.exit_code == 0 and calls == [(qc.root, "crc-02", tmp_path, qc.slide)]
    refused = CliRunner().invoke(app, ["qc", str(qc.root), "--wsi", str(qc.slide)])
    assert refused.exit_code == 2 and "--wsi needs exactly one --section" in refused.output


def test_title_carries_the_qc_numbers(qc: QcCorpus) -> None:
    section = load_section(qc.root, "crc-02")
    lines = qc_title(section).splitlines()
    assert lines[0] == "crc-02  (visium / colon / human)"
    assert lines[1].startswith("86 pairs (9 of 95 planned dropped off tissue), 114 units, 40 genes")
    assert lines[2].startswith("mpp 0.5000 um/px (embedded), pitch implies 0.5000 (+0.0%); tissue")
    fitted = dataclasses.replace(
        section,
        row={
            **section.row,
            "qc_landmark_pairs": 6,
            "qc_landmark_rms_um": 3.14,
            "qc_landmark_max_um": 7.9,
        },
    )
    assert qc_title(fitted).splitlines()[3] == (
        "landmark fit: 6 pairs, residual rms 3.1 um, max 7.9 um"
    )


def test_a_section_in_several_parts_reads_like_one(qc: QcCorpus, tmp_path: Path) -> None:
    base = qc.root.parent
    request = SectionRequest(
        "visium",
        base / "visium" / "outs",
        qc.slide,
        "crc-01",
        base / "visium" / "native_to_wsi.csv",
        {"species": "human"},
    )
    build_section(request, tmp_path / "corpus", BuildConfig(pairs_per_shard=50))
    split, whole = load_section(tmp_path / "corpus", "crc-01"), load_section(qc.root, "crc-01")
    assert split.parts["part"].tolist() == [0, 1, 2]
    assert split.units["pair"].tolist() == whole.units["pair"].tolist() == list(range(123))
    assert split.units["pair_index"].tolist() == [p % 50 for p in range(123)]
    assert split.units["unit_id"].tolist() == whole.units["unit_id"].tolist()
    assert np.array_equal(patch_background(split, 4.0).image, patch_background(whole, 4.0).image)
    assert validate_corpus(tmp_path / "corpus") == []
