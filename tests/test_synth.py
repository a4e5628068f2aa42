"""Tests of the synthetic slide and bundle generator (fast: small slides, one shared fixture)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import h5py
import imagecodecs
import numpy as np
import openslide
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from histmol.genes import is_ensembl_id
from histmol.synth import (
    SyntheticSlide,
    TissueModel,
    gene_panel,
    make_slide,
    simulate_counts,
    write_pyramidal_tiff,
    write_pyramidal_tiff_from_array,
    write_st_bundle,
    write_visium_bundle,
)
from histmol.synth.expression import MARKERS, circle_area_um2

MPP = 0.5


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 2.4 x 2.0 mm slide at 0.5 um/px: 4800 x 4000 px, 4 levels."""
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    return make_slide(path, width_um=2400, height_um=2000, mpp=MPP, seed=3, n_regions=4)


def _read_level(path: Path, level: int) -> np.ndarray:
    """A whole pyramid level as OpenSlide decodes it (RGB)."""
    with openslide.OpenSlide(path) as osr:
        w, h = osr.level_dimensions[level]
        return np.asarray(osr.read_region((0, 0), level, (w, h)).convert("RGB"))


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_openslide_sees_every_level_with_mpp(slide: SyntheticSlide) -> None:
    """Top-level pages + CENTIMETER resolution: OpenSlide reports all levels and the mpp."""
    with openslide.OpenSlide(slide.path) as osr:
        assert osr.level_count == 4
        assert osr.level_dimensions == ((4800, 4000), (2400, 2000), (1200, 1000), (600, 500))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(MPP)
        assert osr.properties["openslide.comment"].startswith("histmol synthetic slide")
        assert [round(d) for d in osr.level_downsamples] == [1, 2, 4, 8]
    assert slide.path.stat().st_mode & 0o444 == 0o444


def _jpeg_error(image: np.ndarray) -> float:
    """Mean abs error of a q90 4:2:0 JPEG round trip: the tolerance a level can be held to."""
    rounded = np.round(image).astype(np.uint8)
    encoded = imagecodecs.jpeg8_encode(rounded, level=90, outcolorspace="ycbcr", subsampling="420")
    return float(np.abs(imagecodecs.jpeg8_decode(encoded) - image).mean())


def test_levels_are_box_downsamples_of_level0(slide: SyntheticSlide) -> None:
    """Every level is the box mean of level-0 content, to within one JPEG round trip."""
    x0, y0, w, h = 1536, 1280, 512, 512  # tile-aligned at every level read
    truth = slide.tile_source(x0, y0, w, h).astype(np.float64)
    for level in (0, 1, 2):
        f = 2**level
        box = truth.reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
        got = _read_level(slide.path, level)[y0 // f : (y0 + h) // f, x0 // f : (x0 + w) // f]
        error = np.abs(got - box).mean()
        assert error <= 1.1 * _jpeg_error(box) + 0.2, level
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):  # aligned, not off by a pixel
            assert error < np.abs(got - np.roll(box, (dy, dx), axis=(0, 1))).mean()


def test_tile_source_is_seamless_and_deterministic(slide: SyntheticSlide) -> None:
    """Rendering is a pure function of global coordinates and the seed."""
    x, y, w, h = 1001, 997, 700, 333
    whole = slide.tile_source(x, y, w, h)
    src = slide.tile_source
    top = np.concatenate([src(x, y, 257, 100), src(x + 257, y, w - 257, 100)], axis=1)
    rest = h - 100
    bottom = np.concatenate([src(x, y + 100, 13, rest), src(x + 13, y + 100, w - 13, rest)], axis=1)
    pieces = np.concatenate([top, bottom], axis=0)
    assert np.array_equal(whole, pieces)
    fresh = TissueModel(slide.width, slide.height, mpp=MPP, seed=3, n_regions=4)
    assert np.array_equal(fresh.render(x, y, w, h), whole)
    other = TissueModel(slide.width, slide.height, mpp=MPP, seed=4, n_regions=4)
    assert not np.array_equal(other.render(x, y, w, h), whole)


def test_region_at_matches_rendering(slide: SyntheticSlide) -> None:
    """Ground-truth labels agree with the pixels: glass is white, tissue is stained."""
    image = slide.tile_source(0, 0, slide.width, slide.height)
    yy, xx = np.mgrid[5 : slide.height : 37, 3 : slide.width : 41]
    labels = slide.region_at(xx + 0.5, yy + 0.5)
    assert set(np.unique(labels)) == set(range(len(slide.region_names)))
    brightness = image[yy, xx].mean(axis=-1)
    assert brightness[labels == 0].min() > 200  # glass
    assert np.median(brightness[labels > 0]) < 200  # stained tissue
    node_x = (np.arange(slide.labels.shape[1]) + 0.5) * slide.label_um / MPP
    node_y = (np.arange(slide.labels.shape[0]) + 0.5) * slide.label_um / MPP
    inside = (node_x[None, :] < slide.width - 2) & (node_y[:, None] < slide.height - 2)
    at_nodes = slide.region_at(node_x[None, :], node_y[:, None])
    assert (at_nodes == slide.labels)[inside].mean() > 0.97  # nodes vs 1 um block centres


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    """Reruns are byte-identical (benchmarks and caches rely on it); no temporaries left."""
    runs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        s = make_slide(folder / "slide.tif", width_um=1400, height_um=1200, mpp=1.0, seed=7)
        write_visium_bundle(folder / "visium", s, seed=7, n_genes=40)
        write_visium_bundle(
            folder / "visium1", s, layout="spaceranger1", matrix="mtx", seed=7, n_genes=40
        )
        write_st_bundle(folder / "st", s, seed=7, n_genes=40)
        runs.append(_digest(folder))
    assert runs[0] == runs[1]
    assert not [p for p in (tmp_path / "a").rglob("*") if p.name.startswith(".")]
    s2 = make_slide(tmp_path / "c.tif", width_um=1400, height_um=1200, mpp=1.0, seed=8)
    assert hashlib.sha256(s2.path.read_bytes()).hexdigest() != runs[0]["slide.tif"]


def test_visium_h5_and_positions_match_ground_truth(
    slide: SyntheticSlide, tmp_path: Path
) -> None:
    """The 10x h5 reads back exactly; fullres positions map through the CSV to the truth."""
    gt = write_visium_bundle(tmp_path / "run", slide, seed=1, n_genes=60)
    outs = tmp_path / "run" / "outs"
    with h5py.File(outs / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        counts = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape)
        barcodes = m["barcodes"][()].astype(str)
        ids = m["features/id"][()].astype(str)
        assert m["features/_all_tag_keys"][()].tolist() == [b"genome"]
        assert set(m["features/feature_type"][()].astype(str)) == {"Gene Expression"}
        assert f.attrs["filetype"] == b"matrix"
    assert shape == (60, len(gt.unit_ids))
    assert (counts.T != gt.counts).nnz == 0
    assert barcodes.tolist() == list(gt.unit_ids) == sorted(gt.unit_ids)
    assert all(len(b) == 18 and b.endswith("-1") and set(b[:16]) <= set("ACGT") for b in barcodes)
    assert ids.tolist() == gt.genes["gene_id"].tolist()

    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
    assert list(positions.columns) == [
        "barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"
    ]
    assert ((positions.array_row + positions.array_col) % 2 == 0).all()
    assert positions.array_row.between(0, 77).all() and positions.array_col.between(0, 127).all()
    assert set(positions.loc[positions.in_tissue == 1, "barcode"]) == set(barcodes)
    matrix = np.loadtxt(tmp_path / "run" / "native_to_wsi.csv", delimiter=",")
    assert np.array_equal(matrix, gt.native_to_wsi)
    assert np.linalg.det(matrix[:2, :2]) < 0  # rotation + flip
    row = positions.set_index("barcode").loc[barcodes]
    ones = np.ones(len(row))
    native = np.stack([row.pxl_col_in_fullres, row.pxl_row_in_fullres, ones]).astype(float)
    wsi = matrix @ native
    assert np.array_equal(wsi[0], gt.x_wsi_px) and np.array_equal(wsi[1], gt.y_wsi_px)
    assert np.array_equal(gt.region, slide.region_at(gt.x_wsi_px, gt.y_wsi_px))

    scale = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    assert scale["spot_diameter_fullres"] == pytest.approx(65.0 / MPP)  # a theoretical 65 um spot
    hires = np.asarray(Image.open(outs / "spatial" / "tissue_hires_image.png").convert("RGB"))
    assert max(hires.shape[:2]) == 2000
    level1 = _read_level(slide.path, 1)
    hx = (row.pxl_col_in_fullres.to_numpy() * scale["tissue_hires_scalef"]).astype(int)
    hy = (row.pxl_row_in_fullres.to_numpy() * scale["tissue_hires_scalef"]).astype(int)
    a = hires[hy, hx].astype(float)
    b = level1[(gt.y_wsi_px / 2).astype(int), (gt.x_wsi_px / 2).astype(int)].astype(float)
    assert np.abs(a - b).mean() < 0.5 * np.abs(a - b[::-1]).mean()  # the PNG is the native frame


def test_visium_spaceranger1_mtx_layout(slide: SyntheticSlide, tmp_path: Path) -> None:
    """Space Ranger 1.x: headerless positions, MEX matrix; a user transform is honoured."""
    flip = np.array([[-2.0, 0.0, slide.width], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    gt = write_visium_bundle(
        tmp_path / "run", slide, layout="spaceranger1", matrix="mtx", native_to_wsi=flip, n_genes=30
    )
    outs = tmp_path / "run" / "outs"
    assert not (outs / "spatial" / "tissue_positions.csv").exists()
    positions = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None)
    assert positions.shape[1] == 6 and positions[0].str.endswith("-1").all()
    folder = outs / "filtered_feature_bc_matrix"
    with gzip.open(folder / "matrix.mtx.gz") as fh:
        mtx = sp.csr_matrix(scipy.io.mmread(fh))
    features = pd.read_csv(folder / "features.tsv.gz", sep="\t", header=None)
    barcodes = pd.read_csv(folder / "barcodes.tsv.gz", header=None)[0].tolist()
    assert (mtx.T != gt.counts).nnz == 0
    assert features[2].eq("Gene Expression").all()
    assert features[0].tolist() == gt.genes["gene_id"].tolist()
    assert barcodes == list(gt.unit_ids)
    scale = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    # one native px is 2 WSI px here
    assert scale["spot_diameter_fullres"] == pytest.approx(65.0 / (2 * MPP))
    row = positions.set_index(0).loc[barcodes]
    assert np.array_equal(flip[0, 0] * row[5].to_numpy(float) + flip[0, 2], gt.x_wsi_px)
    assert np.linalg.det(gt.native_to_wsi[:2, :2]) < 0


def test_markers_follow_regions(slide: SyntheticSlide, tmp_path: Path) -> None:
    """Morphology drives expression: each region's markers are higher inside it."""
    gt = write_visium_bundle(tmp_path / "run", slide, seed=2, n_genes=80)
    norm = gt.counts.multiply(1.0 / np.asarray(gt.counts.sum(axis=1))).tocsr()
    symbols = gt.genes["symbol"].tolist()
    checked = 0
    for label, name in enumerate(slide.region_names):
        inside = gt.region == label
        if label == 0 or inside.sum() < 5 or (~inside & (gt.region > 0)).sum() < 5:
            continue
        cols = [symbols.index(s) for s in MARKERS[name] if s in symbols]
        score = np.asarray(norm[:, cols].sum(axis=1)).ravel()
        assert score[inside].mean() > 2.0 * score[~inside & (gt.region > 0)].mean(), name
        checked += 1
    assert checked >= 2


def test_st_bundle(slide: SyntheticSlide, tmp_path: Path) -> None:
    """Legacy ST: stdata, selection and JPEG agree with the rotated array ground truth."""
    gt = write_st_bundle(tmp_path / "st", slide, seed=5, n_genes=50, image_mpp=1.0)
    folder = tmp_path / "st"
    stdata = pd.read_csv(folder / "synthetic_st_stdata.tsv", sep="\t", index_col=0)
    assert stdata.index.tolist() == list(gt.unit_ids)
    assert all(is_ensembl_id(c) for c in stdata.columns)
    assert (sp.csr_matrix(stdata.to_numpy()) != gt.counts).nnz == 0
    selection = pd.read_csv(folder / "synthetic_st_selection.tsv", sep="\t")
    assert list(selection.columns) == ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
    assert selection.x.between(1, 33).all() and selection.y.between(1, 35).all()
    ids = selection.x.astype(str) + "x" + selection.y.astype(str)
    sel = selection.assign(id=ids).set_index("id")
    sel = sel.loc[list(gt.unit_ids)]
    assert np.abs(sel.pixel_x.to_numpy() - gt.x_wsi_px).max() <= 0.005 + 1e-9
    assert np.abs(sel.pixel_y.to_numpy() - gt.y_wsi_px).max() <= 0.005 + 1e-9
    matrix = np.loadtxt(folder / "native_to_wsi.csv", delimiter=",")
    mapped = matrix @ np.stack([sel.new_x, sel.new_y, np.ones(len(sel))])
    assert np.allclose(mapped[0], gt.x_wsi_px, atol=1e-6)
    assert np.allclose(mapped[1], gt.y_wsi_px, atol=1e-6)
    rotation = np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))
    assert 1.0 < rotation < 5.0 and np.linalg.det(matrix[:2, :2]) > 0
    assert np.hypot(matrix[0, 0], matrix[1, 0]) == pytest.approx(200.0 / gt.wsi_mpp)  # 200 um pitch
    image = np.asarray(Image.open(folder / "synthetic_st.jpg"))
    assert image.shape[:2] == gt.extra["image_size"][::-1]
    assert (gt.in_tissue == sel.selected.astype(bool).to_numpy()).all()
    assert np.array_equal(gt.region, slide.region_at(gt.x_slide_px, gt.y_slide_px))
    none = write_st_bundle(tmp_path / "none", slide, positions="none", seed=5, n_genes=50)
    assert not list((tmp_path / "none").glob("*_selection.tsv"))
    assert np.array_equal(none.x_native, np.round(none.x_native))


def test_counts_scale_with_unit_area_and_tissue() -> None:
    """A 55 um spot captures far more than a 2 um bin; glass captures almost nothing."""
    labels = np.array([1] * 200 + [0] * 200)
    spot = simulate_counts(labels, n_genes=100, unit_area_um2=circle_area_um2(55.0), seed=0)
    tiny = simulate_counts(labels, n_genes=100, unit_area_um2=4.0, seed=0)
    assert spot.dtype == np.int32 and spot.shape == (400, 100) and sp.isspmatrix_csr(spot)
    spot_totals, tiny_totals = np.asarray(spot.sum(1)).ravel(), np.asarray(tiny.sum(1)).ravel()
    assert spot_totals[:200].mean() > 100 * tiny_totals[:200].mean() > 0
    assert spot_totals[200:].mean() < 0.05 * spot_totals[:200].mean()
    mixed = simulate_counts(np.array([[1, 2], [2, 2]]), n_genes=100, unit_area_um2=3000.0, seed=0)
    assert mixed.shape == (2, 100)


def test_gene_panel() -> None:
    """Ids look like real Ensembl ids, are unique, and smaller panels are prefixes."""
    panel = gene_panel(300, n_controls=5)
    genes = panel[panel.feature_type == "Gene Expression"]
    assert len(genes) == 300 and panel.gene_id.is_unique
    assert all(is_ensembl_id(i) and i.startswith("ENSG") and len(i) == 15 for i in genes.gene_id)
    assert panel.iloc[-5:].symbol.str.startswith("NegControlProbe_").all()
    assert gene_panel(40).symbol.tolist() == panel.symbol.tolist()[:40]  # panels nest


def test_pyramid_writer_is_atomic_and_streams(tmp_path: Path) -> None:
    """A failing source leaves neither the target nor temporaries behind."""
    image = (np.arange(600 * 700 * 3) % 251).astype(np.uint8).reshape(600, 700, 3)
    write_pyramidal_tiff_from_array(tmp_path / "a.tif", image, mpp=0.25, min_level_side=256)
    with openslide.OpenSlide(tmp_path / "a.tif") as osr:
        assert osr.level_dimensions == ((700, 600), (350, 300), (175, 150))

    def broken(x: int, y: int, w: int, h: int) -> np.ndarray:
        """Fail on the second tile row."""
        if y > 0:
            raise RuntimeError("source failed")
        return np.zeros((h, w, 3), np.uint8)

    with pytest.raises(RuntimeError):
        write_pyramidal_tiff(tmp_path / "b.tif", broken, 500, 600, mpp=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]
