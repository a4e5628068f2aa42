"""Exports: SpatialData opens with true geometry, counts and frames; AnnData plots in scanpy."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import spatialdata
from qc_corpus import QcCorpus, shared_qc_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.errors import ConfigError
from histmol.export import export_section
from histmol.qc.section_data import load_section, patch_background, wsi_background
from histmol.shards.atomic import atomic_write_parquet
from histmol.shards.corpus_tables import sections_table
from histmol.wsi import open_wsi


@pytest.fixture(scope="session")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def crc01_zarr(qc: QcCorpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "crc-01.zarr"
    return export_section(
        qc.root, "crc-01", out, format="spatialdata", slide=qc.slide, image_mpp=1.0
    )


def expected_counts(qc: QcCorpus, section_id: str) -> tuple[np.ndarray, list[str]]:
    section = load_section(qc.root, section_id, counts=True)
    panel = np.sort(np.asarray(section.row["panel"]))
    genes = pd.read_parquet(qc.root / "genes.parquet")
    return section.counts[:, panel].toarray(), genes["gene_id"].to_numpy()[panel].tolist()


def test_spatialdata_table_holds_the_raw_counts(qc: QcCorpus, crc01_zarr: Path) -> None:
    sdata = spatialdata.read_zarr(crc01_zarr)
    assert set(sdata.images) == {"crc-01_image"}
    assert set(sdata.shapes) == {"crc-01_units", "crc-01_patches"}
    table = sdata.tables["table"]
    counts, gene_ids = expected_counts(qc, "crc-01")
    assert table.shape == (123, 40) and table.var_names.tolist() == gene_ids
    assert np.array_equal(table.X.toarray(), counts) and table.X.dtype == np.int32
    units = pq.read_table(qc.root / "shards" / "crc-01" / "part-00000.parquet").to_pandas()
    assert table.obs_names.tolist() == units["unit_id"].tolist()
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (
        "crc-01_units",
        "region",
        "instance_id",
    )
    assert table.obs["instance_id"].tolist() == sdata.shapes["crc-01_units"].index.tolist()


def test_spatialdata_units_have_true_geometry_in_every_frame(
    qc: QcCorpus, crc01_zarr: Path
) -> None:
    sdata = spatialdata.read_zarr(crc01_zarr)
    units = pq.read_table(qc.root / "shards" / "crc-01" / "part-00000.parquet").to_pandas()
    circles = sdata.shapes["crc-01_units"]
    assert np.array_equal(circles.geometry.x, units["x_wsi_px"])
    assert np.array_equal(circles.geometry.y, units["y_wsi_px"])
    assert set(circles["radius"]) == {55.0}  # a 55 um spot at 0.5 um/px: 110 px across
    in_um = spatialdata.transform(circles, to_coordinate_system="um")
    assert np.allclose(in_um.geometry.x, units["x_um"]) and np.allclose(
        in_um.geometry.y, units["y_um"]
    )
    assert np.allclose(in_um["radius"], 27.5)
    # the native frame is Space Ranger's full-resolution pixels: compare with the bundle itself
    positions = pd.read_csv(
        qc.root.parent / "visium" / "outs" / "spatial" / "tissue_positions.csv", index_col="barcode"
    ).loc[units["unit_id"]]
    native = spatialdata.transform(circles, to_coordinate_system="native")
    assert np.allclose(native.geometry.x, positions["pxl_col_in_fullres"], atol=1e-6)
    assert np.allclose(native.geometry.y, positions["pxl_row_in_fullres"], atol=1e-6)
    patches = sdata.shapes["crc-01_patches"]
    bounds = patches.geometry.bounds.to_numpy()
    first = units.drop_duplicates("pair_index")
    assert np.allclose(bounds[:, :2], first[["patch_x0_wsi_px", "patch_y0_wsi_px"]])
    assert np.allclose(bounds[:, 2:] - bounds[:, :2], 224.0)


def test_spatialdata_image_is_the_downsampled_wsi(qc: QcCorpus, crc01_zarr: Path) -> None:
    sdata = spatialdata.read_zarr(crc01_zarr)
    image = sdata.images["crc-01_image"]
    assert [image[k]["image"].shape for k in image] == [(3, 1200, 1400), (3, 600, 700)]
    with open_wsi(qc.slide) as slide:
        expected = wsi_background(slide, 2.0).image
    assert np.array_equal(image["scale0"]["image"].values.transpose(1, 2, 0), expected)
    extent = spatialdata.get_extent(image, coordinate_system="wsi_px")
    assert extent == {"x": (0.0, 2800.0), "y": (0.0, 2400.0)}
    extent_um = spatialdata.get_extent(image, coordinate_system="um")
    assert extent_um == {"x": (0.0, 1400.0), "y": (0.0, 1200.0)}


def test_square_units_become_polygons_and_patches_back_the_image(
    qc: QcCorpus, tmp_path: Path
) -> None:
    root = qc.copy(tmp_path / "corpus")
    records = pq.read_table(root / "sections.parquet").to_pylist()
    for record in records:
        if record["section_id"] == "crc-02":  # pretend 16 um bins: the geometry follows the row
            record["unit_shape"], record["unit_size_um"] = "square", 16.0
    atomic_write_parquet(root / "sections.parquet", sections_table(records))
    out = export_section(root, "crc-02", tmp_path / "crc-02.zarr", format="spatialdata")
    sdata = spatialdata.read_zarr(out)
    squares = sdata.shapes["crc-02_units"]
    bounds = squares.geometry.bounds.to_numpy()
    units = pq.read_table(root / "shards" / "crc-02" / "part-00000.parquet").to_pandas()
    assert np.allclose(bounds[:, 0], units["x_wsi_px"] - 16.0)
    assert np.allclose(bounds[:, 3], units["y_wsi_px"] + 16.0)
    assert np.allclose(squares.geometry.area, 32.0 * 32.0)
    mosaic = patch_background(load_section(root, "crc-02"), 4.0).image  # 2 um/px
    assert np.array_equal(sdata.images["crc-02_image"].values.transpose(1, 2, 0), mosaic)


@pytest.mark.filterwarnings("ignore:Use `squidpy.pl.spatial_scatter` instead:FutureWarning")
def test_anndata_plots_with_scanpy_on_the_wsi(qc: QcCorpus, tmp_path: Path) -> None:
    out = export_section(
        qc.root, "crc-01", tmp_path / "crc-01.h5ad", format="anndata", slide=qc.slide
    )
    adata = anndata.read_h5ad(out)
    counts, gene_ids = expected_counts(qc, "crc-01")
    assert np.array_equal(adata.X.toarray(), counts) and adata.var_names.tolist() == gene_ids
    units = pq.read_table(qc.root / "shards" / "crc-01" / "part-00000.parquet").to_pandas()
    assert np.array_equal(adata.obsm["spatial"], units[["x_wsi_px", "y_wsi_px"]].to_numpy())
    library = adata.uns["spatial"]["crc-01"]
    assert library["images"]["hires"].shape == (1714, 2000, 3)
    assert library["scalefactors"]["tissue_hires_scalef"] == pytest.approx(2000 / 2800)
    assert library["scalefactors"]["spot_diameter_fullres"] == 110.0
    assert library["metadata"]["image_source"] == "wsi"
    assert adata.uns["histmol"]["mpp"] == 0.5
    assert np.array_equal(
        adata.uns["histmol"]["native_to_wsi"], load_section(qc.root, "crc-01").native_to_wsi
    )
    import scanpy as sc

    [ax] = sc.pl.spatial(
        adata, color="total_counts", library_id="crc-01", img_key="hires", show=False
    )
    # scanpy draws one circle per unit in hires-image px: centre = spatial * tissue_hires_scalef,
    # diameter = spot_diameter_fullres * tissue_hires_scalef
    [circles] = ax.collections
    boxes = np.array([[p.vertices.min(0), p.vertices.max(0)] for p in circles.get_paths()])
    scale = library["scalefactors"]["tissue_hires_scalef"]
    centres, expected = boxes.mean(axis=1), adata.obsm["spatial"] * scale
    by_position = lambda a: a[np.lexsort((a[:, 1], a[:, 0]))]  # noqa: E731 - scanpy reorders
    assert np.allclose(by_position(centres), by_position(expected))
    assert np.allclose(boxes[:, 1] - boxes[:, 0], 110.0 * scale)


def test_export_refuses_to_overwrite_and_unknown_formats(qc: QcCorpus, tmp_path: Path) -> None:
    target = tmp_path / "x.h5ad"
    target.write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"x.h5ad: already exists; remove it or pass --force"):
        export_section(qc.root, "crc-01", target, format="anndata")
    assert target.read_bytes() == b"mine"
    with pytest.raises(
        ConfigError, match=r"unknown export format 'loom'; one of spatialdata, anndata"
    ):
        export_section(qc.root, "crc-01", tmp_path / "y", format="loom")
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(qc.root),
            "--section",
            "st-01",
            "--format",
            "anndata",
            "--out",
            str(target),
            "--force",
        ],
    )
    assert result.exit_code == 0, result.output
    assert anndata.read_h5ad(target).n_obs == 26
