"""Visium HD adapter: synthetic Space Ranger bundles, streamed 2 um aggregation, builds, bad input.

Also the real VisiumIO fixture (a 10-bin subset of a mouse brain section) with its quirks.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from adapter_contract import AdapterContract, BundleCase
from conftest import fixture_path
from gene_space_helpers import truth_columns

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError
from histmol.registration import apply_affine
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_visium_hd_bundle
from platform_adapters import visium_hd
from platform_adapters._tenx import read_10x_h5
from platform_adapters._visium_hd_bins import bin_matrix
from platform_adapters._visium_hd_cells import polygon_centroid
from platform_adapters._visium_hd_positions import (
    POSITION_COLUMNS,
    format_barcodes,
    parse_barcodes,
    read_positions,
)

FIXTURE = "visiumhd_visiumio_mousebrain"
CONFIG = BuildConfig(patch_px=64)  # 32 um patches at 0.5 um/px: 16 bins of 8 um each
BINNED = Path("binned_outputs")


@pytest.fixture(scope="module")
def synthetic(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[SyntheticSlide, GroundTruth, Path]:
    """A 600 um section with 2, 8 and 16 um folders, plus a copy holding only the 2 um one."""
    root = tmp_path_factory.mktemp("hd")
    slide = make_slide(root / "slide.tif", width_um=600.0, height_um=600.0, mpp=0.5, seed=5)
    truth = write_visium_hd_bundle(root / "sample-hd", slide, seed=5, n_genes=60, images=False)
    fine_only = root / "fine-only" / "outs"
    shutil.copytree(truth.bundle / BINNED / "square_002um", fine_only / BINNED / "square_002um")
    return slide, truth, fine_only


def fine_copy(fine_only: Path, tmp_path: Path) -> Path:
    """A writable copy of the 2 um-only bundle; returns its 2 um folder."""
    outs = tmp_path / "outs"
    shutil.copytree(fine_only, outs)
    return outs / BINNED / "square_002um"


class TestVisiumHDContract(AdapterContract):
    platform = "visium-hd"

    @pytest.fixture
    def bundle(self, synthetic: tuple[SyntheticSlide, GroundTruth, Path]) -> BundleCase:
        return synthetic[1].bundle, {}


# -- the synthetic bundle itself ---------------------------------------------------------------


def coarse_truth(truth: GroundTruth, factor: int) -> tuple[pd.DataFrame, sp.csr_matrix]:
    """The 2 um truth summed by hand into bins `factor` times coarser: units and counts."""
    rc = np.array([[int(u[8:13]), int(u[14:19])] for u in truth.unit_ids.tolist()])
    coarse = pd.DataFrame({"row": rc[:, 0] // factor, "col": rc[:, 1] // factor})
    keys, inverse = np.unique(coarse.to_numpy(), axis=0, return_inverse=True)
    summing = sp.csr_matrix(
        (np.ones(len(rc)), (inverse.ravel(), np.arange(len(rc)))), shape=(len(keys), len(rc))
    )
    counts = sp.csr_matrix(summing @ truth.counts, dtype=np.int64)
    units = pd.DataFrame({"array_row": keys[:, 0], "array_col": keys[:, 1]})
    units["unit_id"] = [f"s_{2 * factor:03d}um_{r:05d}_{c:05d}-1" for r, c in keys.tolist()]
    centre = (factor - 1) / 2.0
    xn, yn = apply_affine(
        truth.extra["array_to_native"], keys[:, 1] * factor + centre, keys[:, 0] * factor + centre
    )
    units["x_wsi_px"], units["y_wsi_px"] = apply_affine(truth.native_to_wsi, xn, yn)
    return units, counts


def test_synthetic_folders_are_space_ranger_layout_and_exact_sums(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path],
) -> None:
    _, truth, _ = synthetic
    n_rows, n_cols = truth.extra["grid_shape"]
    fine = read_10x_h5(truth.bundle / BINNED / "square_002um" / "filtered_feature_bc_matrix.h5")
    assert fine.barcodes.tolist() == sorted(fine.barcodes.tolist()) == truth.unit_ids.tolist()
    assert fine.barcodes[0].startswith("s_002um_") and len(fine.barcodes[0]) == 21
    assert (fine.counts != truth.counts).nnz == 0
    for size in (8, 16):
        factor = size // 2
        folder = truth.bundle / BINNED / f"square_{size:03d}um"
        positions = pq.read_table(folder / "spatial" / "tissue_positions.parquet")
        assert positions.schema.names == list(POSITION_COLUMNS)
        assert [str(t) for t in positions.schema.types] == [
            "string",
            "int32",
            "int32",
            "int32",
            "double",
            "double",
        ]
        assert positions.num_rows == -(-n_rows // factor) * -(-n_cols // factor)  # whole grid
        scale = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
        assert scale["bin_size_um"] == size
        assert scale["spot_diameter_fullres"] * scale["microns_per_pixel"] == pytest.approx(size)
        matrix = read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
        units, counts = coarse_truth(truth, factor)
        assert matrix.barcodes.tolist() == units["unit_id"].tolist()  # in-tissue = any 2 um bin
        assert (sp.csr_matrix(matrix.counts, dtype=np.int64) != counts).nnz == 0
        table = positions.to_pandas().set_index("barcode").loc[units["unit_id"]]
        assert (table["in_tissue"] == 1).all()
        x, y = apply_affine(
            truth.native_to_wsi,
            table["pxl_col_in_fullres"].to_numpy(),
            table["pxl_row_in_fullres"].to_numpy(),
        )
        np.testing.assert_allclose(x, units["x_wsi_px"], atol=1e-9)
        np.testing.assert_allclose(y, units["y_wsi_px"], atol=1e-9)


# -- aggregation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16])
def test_aggregating_2um_equals_the_space_ranger_folder(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], size: int
) -> None:
    _, truth, fine_only = synthetic
    direct = visium_hd.read(truth.bundle, wsi="x.tif", bin_um=size)
    summed = visium_hd.read(fine_only, wsi="x.tif", bin_um=size)
    assert (direct.qc["aggregated"], summed.qc["aggregated"]) == (False, True)
    assert direct.provenance.layout == f"square_{size:03d}um"
    assert summed.provenance.layout == f"square_002um->square_{size:03d}um"
    assert summed.units["unit_id"].tolist() == direct.units["unit_id"].tolist()
    assert summed.genes["gene_id"].tolist() == direct.genes["gene_id"].tolist()
    assert (summed.counts.tocsr() != direct.counts.tocsr()).nnz == 0
    assert summed.counts.sum() == truth.counts.sum()
    for axis in ("x_native", "y_native"):
        np.testing.assert_allclose(summed.units[axis], direct.units[axis], rtol=0, atol=1e-6)
    assert summed.qc["array_fit_residual_max_px"] < 1e-6
    assert summed.qc["array_fit_pitch_um"] == pytest.approx(2.0)
    assert summed.units["n_source_bins"].sum() == len(truth.unit_ids)
    assert summed.units["n_source_bins"].max() == (size // 2) ** 2


def test_aggregation_streams_barcodes_in_any_order(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    _, truth, fine_only = synthetic
    folder = fine_copy(fine_only, tmp_path)
    matrix = read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    order = np.random.default_rng(0).permutation(len(matrix.barcodes))
    shuffled = sp.csc_matrix(matrix.counts[order].T)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r+") as f:
        for name, values in (
            ("barcodes", matrix.barcodes[order].astype("S")),
            ("data", shuffled.data),
            ("indices", shuffled.indices.astype(np.int64)),
            ("indptr", shuffled.indptr.astype(np.int64)),
        ):
            del f["matrix"][name]
            f["matrix"][name] = values
    positions = folder / "spatial" / "tissue_positions.parquet"
    for size in (2, 16):
        expected = visium_hd.read(truth.bundle, wsi="x.tif", bin_um=size)
        for chunk in (997, 50_000):  # far fewer and far more barcodes than a band holds
            grid = read_positions(positions, 2, keep_pixels=False)
            binned = bin_matrix(folder / "filtered_feature_bc_matrix.h5", grid, factor=size // 2,
                                min_match_rate=0.9, chunk=chunk)
            keys = [f"s_{size:03d}um_{r:05d}_{c:05d}-1"
                    for r, c in zip(binned.row, binned.col, strict=True)]
            assert keys == expected.units["unit_id"].tolist()
            assert (binned.panel.counts.tocsr() != expected.counts.tocsr()).nnz == 0


# -- end to end in grid mode ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16])
def test_grid_build_keeps_every_count_and_places_bins_exactly(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path, size: int
) -> None:
    slide, truth, fine_only = synthetic
    out = tmp_path / "corpus"
    request = SectionRequest(
        "visium-hd", fine_only, slide.path, "hd", truth.transform_path, options={"bin_um": size}
    )
    result = build_section(request, out, CONFIG)
    manifest = pd.read_parquet(out / "manifest.parquet")
    shard = pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])
    row = pd.read_parquet(out / "sections.parquet").iloc[0]
    assert (
        row["qc_mode"] == "grid" and row["unit_shape"] == "square" and row["unit_size_um"] == size
    )
    expected, counts = coarse_truth(truth, size // 2)
    expected = expected.set_index("unit_id")
    # every bin is where the array grid puts it
    placed = expected.loc[shard["unit_id"]]
    np.testing.assert_allclose(shard["x_wsi_px"], placed["x_wsi_px"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(shard["y_wsi_px"], placed["y_wsi_px"], rtol=0, atol=1e-6)
    # the shard holds exactly the bins whose centre falls in a kept patch, no other
    footprint = 64 * 0.5 / slide.mpp
    cell = np.floor(expected[["x_wsi_px", "y_wsi_px"]].to_numpy() / footprint)
    kept = {
        (x, y)
        for x, y in np.floor(
            shard[["patch_x0_wsi_px", "patch_y0_wsi_px"]].to_numpy() / footprint + 0.5
        ).tolist()
    }
    inside = np.array([(x, y) in kept for x, y in cell.tolist()])
    assert set(shard["unit_id"]) == set(expected.index[inside])
    assert len(shard) == result.n_units == inside.sum()
    assert row["qc_n_units_dropped_tissue"] == len(expected) - inside.sum() > 0
    assert row["n_units_read"] == len(expected)
    # counts: the sum over all pairs is the sum over the 2 um bins of the kept coarse bins
    assert shard["counts"].map(sum).sum() == counts[np.flatnonzero(inside)].sum()
    truth_col = truth_columns(truth.genes["gene_id"], truth.genes["symbol"])  # stable -> col
    position = pd.Series(np.arange(len(expected)), index=expected.index)
    dense = counts.toarray()
    for record in shard.itertuples():
        got = np.zeros(len(truth.genes), np.int64)
        got[truth_col.loc[np.asarray(record.gene_idx)].to_numpy()] = record.counts
        np.testing.assert_array_equal(got, dense[position[record.unit_id]])


# -- the real fixture ------------------------------------------------------------------------------


def test_real_fixture_and_its_quirks() -> None:
    root = fixture_path(FIXTURE)
    folder = root / BINNED / "square_002um"
    # Quirks of this VisiumIO subset (written by R, not by Space Ranger), stated so none surprises:
    # 1. the MEX `*.tsv.gz` files are plain text (no gzip magic) with quoted values; Space Ranger
    #    writes real gzip. The adapter reads the h5 only, so they never matter.
    for name in ("barcodes.tsv.gz", "features.tsv.gz"):
        raw = (folder / "filtered_feature_bc_matrix" / name).read_bytes()
        assert raw[:2] != b"\x1f\x8b" and raw.startswith(b'"')
    # 2. matrix.mtx.gz is real gzip but an empty 'pattern symmetric' matrix, and the h5 matrix
    #    is all zeros, with uint32 indices/indptr (Space Ranger writes int64) and no file attrs.
    mtx = gzip.decompress((folder / "filtered_feature_bc_matrix" / "matrix.mtx.gz").read_bytes())
    assert mtx.decode().splitlines() == [
        "%%MatrixMarket matrix coordinate pattern symmetric",
        "10 10 0",
    ]
    with h5py.File(folder / "filtered_feature_bc_matrix.h5") as f:
        assert f["matrix/data"].shape == (0,) and f["matrix/indptr"].dtype == np.uint32
        assert dict(f.attrs) == {}
    # 3. only 10 bins scattered over the capture area are listed, and the h5 lists them out of
    #    array order; 4. there is no full-resolution image, only the lowres PNG.
    section = visium_hd.read(root, wsi=folder / "spatial" / "tissue_lowres_image.png", bin_um=2)
    positions = pd.read_parquet(folder / "spatial" / "tissue_positions.parquet")
    assert section.section_id == "visiumhd_visiumio_mousebrain"
    assert section.units["unit_id"].tolist() == positions["barcode"].tolist()  # row-major
    np.testing.assert_array_equal(section.units["x_native"], positions["pxl_col_in_fullres"])
    np.testing.assert_array_equal(section.units["y_native"], positions["pxl_row_in_fullres"])
    assert section.units.loc[0, ["array_row", "array_col"]].tolist() == [305, 1021]
    assert section.genes["gene_id"].tolist()[:3] == [
        "ENSMUSG00000051951",
        "ENSMUSG00000025900",
        "ENSMUSG00000025902",
    ]
    assert (section.n_units, section.n_genes, section.counts.nnz) == (10, 10, 0)
    assert section.native_um_per_unit == pytest.approx(0.2738242950835738)
    np.testing.assert_allclose(section.native_to_wsi, np.diag([0.02505533, 0.02505533, 1.0]))
    qc = section.qc
    assert qc["barcode_match_rate"] == 1.0 and qc["positions_grid_complete"] is False
    assert (qc["positions_grid_rows"], qc["positions_grid_cols"]) == (2399, 2005)
    assert qc["array_fit_pitch_um"] == pytest.approx(1.9988, abs=1e-4)
    assert 1.0 < qc["array_fit_residual_max_px"] < 1.5  # a real array is not exactly affine
    # 8 um bins summed from these 2 um bins: one source bin each, placed through the fit
    coarse = visium_hd.read(root, wsi="x.tif", bin_um=8)
    assert coarse.units["unit_id"].tolist()[0] == "s_008um_00076_00255-1"  # 305 // 4, 1021 // 4
    assert coarse.units["n_source_bins"].tolist() == [1] * 10


# -- cells (Space Ranger 4 segmented outputs) ---------------------------------------------


def write_cells(outs: Path) -> None:
    """Three cell polygons (square, triangle, two-part cell) and a matrix with a fourth cell."""
    folder = outs / "segmented_outputs"
    (folder / "spatial").mkdir(parents=True)
    (folder / "spatial" / "scalefactors_json.json").write_text(
        json.dumps({"microns_per_pixel": 0.5})
    )
    features = [
        {
            "type": "Feature",
            "properties": {"cell_id": 1},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]],
            },
        },
        {
            "type": "Feature",
            "properties": {"cell_id": 2},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[100, 0], [130, 0], [100, 30], [100, 0]]],
            },
        },
        {
            "type": "Feature",
            "properties": {"cell_id": 7},
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[0, 100], [10, 100], [10, 110], [0, 110], [0, 100]]],
                    [[[20, 100], [40, 100], [40, 120], [20, 120], [20, 100]]],
                ],
            },
        },
    ]
    (folder / "cell_segmentations.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    barcodes = [
        "cellid_000000001-1",
        "cellid_000000002-1",
        "cellid_000000007-1",
        "cellid_000000009-1",
    ]
    counts = sp.csc_matrix(np.array([[1, 0, 4, 2], [0, 3, 0, 1], [5, 0, 0, 0]], np.int32))
    with h5py.File(folder / "filtered_feature_cell_matrix.h5", "w") as f:
        for name, values in (
            ("data", counts.data),
            ("indices", counts.indices.astype(np.int64)),
            ("indptr", counts.indptr.astype(np.int64)),
            ("shape", np.array(counts.shape, np.int32)),
            ("barcodes", np.array(barcodes, "S")),
        ):
            f[f"matrix/{name}"] = values
        f["matrix/features/id"] = np.array(["ENSG00000111640", "ENSG00000075624", "NEG_1"], "S")
        f["matrix/features/name"] = np.array(["GAPDH", "ACTB", "NegControlProbe_00001"], "S")
        f["matrix/features/feature_type"] = np.array(["Gene Expression"] * 3, "S")


def test_segmented_cells_are_units_at_their_polygon_centroids(tmp_path: Path) -> None:
    write_cells(tmp_path / "outs")
    section = visium_hd.read(tmp_path, wsi="x.tif", units="cells", min_match_rate=0.75)
    assert section.units["unit_id"].tolist() == [
        "cellid_000000001-1",
        "cellid_000000002-1",
        "cellid_000000007-1",
    ]
    assert section.units["x_native"].tolist() == [20.0, 110.0, (100 * 5 + 400 * 30) / 500]
    assert section.units["y_native"].tolist() == [20.0, 10.0, (100 * 105 + 400 * 110) / 500]
    np.testing.assert_allclose(section.units["area_um2"], [100.0, 112.5, 125.0])
    assert section.unit_shape == "circle" and section.pitch_um is None
    assert section.unit_size_um == pytest.approx(2 * np.sqrt(112.5 / np.pi))
    np.testing.assert_array_equal(section.counts.toarray(), [[1, 0], [0, 3], [4, 0]])
    np.testing.assert_array_equal(section.control_counts["negative_probe"], [5, 0, 0])
    assert section.qc["barcode_match_rate"] == 0.75 and section.qc["n_cell_polygons"] == 3
    with pytest.raises(BundleError, match="cell_segmentations.geojson"):
        visium_hd.read(tmp_path, wsi="x.tif", units="cells")  # 3 of 4 cells under 0.9
    assert polygon_centroid(np.array([[0.0, 0], [4, 0], [4, 2], [0, 2]]))[:3] == (8.0, 2.0, 1.0)


def test_cells_need_segmented_outputs(synthetic: tuple[SyntheticSlide, GroundTruth, Path]) -> None:
    with pytest.raises(BundleError, match="segmented_outputs"):
        visium_hd.read(synthetic[1].bundle, wsi="x.tif", units="cells")
    with pytest.raises(ConfigError, match="units"):
        visium_hd.read(synthetic[1].bundle, wsi="x.tif", units="spots")  # type: ignore[arg-type]


# -- bad input, each naming the file ---------------------------------------------------------------


def rewrite_positions(folder: Path, change: object) -> Path:
    path = folder / "spatial" / "tissue_positions.parquet"
    table = pq.read_table(path).to_pandas()
    pq.write_table(pa.Table.from_pandas(change(table), preserve_index=False), path)  # type: ignore[operator]
    return path


def test_bin_size_and_folder_problems(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    _, truth, fine_only = synthetic
    with pytest.raises(ConfigError, match="multiple of 2"):
        visium_hd.read(truth.bundle, wsi="x.tif", bin_um=7)
    with pytest.raises(ConfigError, match="multiple of 2"):
        visium_hd.read(truth.bundle, wsi="x.tif", bin_um="eight")  # type: ignore[arg-type]
    assert visium_hd.read(truth.bundle, wsi="x.tif", bin_um="16").unit_size_um == 16.0  # type: ignore[arg-type]
    only16 = tmp_path / "only16"
    shutil.copytree(truth.bundle / BINNED / "square_016um", only16 / BINNED / "square_016um")
    with pytest.raises(BundleError, match=r"binned_outputs: no bin folder for 8 um.*square_016um"):
        visium_hd.read(only16, wsi="x.tif", bin_um=8)
    # a 16 um folder filed under square_008um
    wrong = tmp_path / "wrong"
    shutil.copytree(truth.bundle / BINNED / "square_016um", wrong / BINNED / "square_008um")
    with pytest.raises(
        BundleError, match=r"square_008um/spatial/scalefactors_json.json: bin_size_um is 16"
    ):
        visium_hd.read(wrong, wsi="x.tif", bin_um=8)
    folder = fine_copy(fine_only, tmp_path / "nomatrix")
    (folder / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(BundleError, match=r"filtered_feature_bc_matrix.h5: missing"):
        visium_hd.read(folder.parents[1], wsi="x.tif")


def test_scalefactors_must_agree_with_the_positions(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    folder = fine_copy(synthetic[2], tmp_path)
    path = folder / "spatial" / "scalefactors_json.json"
    scale = json.loads(path.read_text())
    scale.update(microns_per_pixel=0.6, spot_diameter_fullres=2 / 0.6)
    path.write_text(json.dumps(scale))
    with pytest.raises(BundleError, match=r"scalefactors_json.json: bins are 4.000 px apart"):
        visium_hd.read(folder.parents[1], wsi="x.tif")
    scale.update(spot_diameter_fullres=7.0)
    path.write_text(json.dumps(scale))
    with pytest.raises(
        BundleError, match="scalefactors_json.json: spot_diameter_fullres x microns"
    ):
        visium_hd.read(folder.parents[1], wsi="x.tif")


def test_parquet_columns_renamed_reordered_or_wrong(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    expected = visium_hd.read(synthetic[2], wsi="x.tif")
    folder = fine_copy(synthetic[2], tmp_path / "a")
    path = rewrite_positions(folder, lambda t: t.rename(columns={"pxl_row_in_fullres": "pxl_y"}))
    with pytest.raises(
        BundleError,
        match=r"tissue_positions.parquet: positions table lacks columns "
        r"\['pxl_row_in_fullres'\]; found columns .*'pxl_y'",
    ):
        visium_hd.read(folder.parents[1], wsi="x.tif")
    rewrite_positions(
        folder,
        lambda t: t.rename(columns={"pxl_y": "pxl_row_in_fullres"})[
            [
                "barcode",
                "array_col",
                "array_row",
                "pxl_col_in_fullres",
                "pxl_row_in_fullres",
                "in_tissue",
            ]
        ],
    )
    reordered = visium_hd.read(folder.parents[1], wsi="x.tif")  # read by name, and reported
    assert reordered.qc["positions_column_order"] == "reordered"
    assert expected.qc["positions_column_order"] == "spaceranger"
    assert (reordered.counts.tocsr() != expected.counts.tocsr()).nnz == 0
    np.testing.assert_array_equal(reordered.units["x_native"], expected.units["x_native"])
    # a barcode that does not name its array_row / array_col
    rewrite_positions(
        folder, lambda t: t.assign(array_row=t["array_row"].where(t.index != 5, 999))
    )
    with pytest.raises(BundleError, match=r"tissue_positions.parquet: barcodes do not name"):
        visium_hd.read(folder.parents[1], wsi="x.tif")
    other = fine_copy(synthetic[2], tmp_path / "b")
    path = rewrite_positions(other, lambda t: pd.concat([t, t.iloc[[3]]]))
    with pytest.raises(BundleError, match=f"{path}: a bin .* is listed twice"):
        visium_hd.read(other.parents[1], wsi="x.tif")
    rewrite_positions(
        other,
        lambda t: t.iloc[:-1].assign(
            pxl_col_in_fullres=t["pxl_col_in_fullres"].where(
                t.index != 500, t["pxl_col_in_fullres"] + 5
            )
        ),
    )
    with pytest.raises(BundleError, match=f"{path}: pixel positions are not an affine image"):
        visium_hd.read(other.parents[1], wsi="x.tif")


def test_too_few_positions_fail_the_match_rate(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    folder = fine_copy(synthetic[2], tmp_path)
    rewrite_positions(folder, lambda t: t[t["array_row"] >= t["array_row"].max() // 2])
    with pytest.raises(
        BundleError, match=r"filtered_feature_bc_matrix.h5: only \d+ of \d+ barcodes"
    ):
        visium_hd.read(folder.parents[1], wsi="x.tif")
    section = visium_hd.read(folder.parents[1], wsi="x.tif", min_match_rate=0.1)
    assert 0.1 < section.qc["barcode_match_rate"] < 0.9


@pytest.mark.parametrize(
    "name", ["spatial/tissue_positions.parquet", "filtered_feature_bc_matrix.h5"]
)
def test_truncated_files_are_named(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path, name: str
) -> None:
    folder = fine_copy(synthetic[2], tmp_path)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match=f"{path}: cannot"):
        visium_hd.read(folder.parents[1], wsi="x.tif")


def test_bin_barcodes_are_formatted_as_space_ranger_writes_them() -> None:
    """format_barcodes is parse_barcodes' inverse, byte for byte."""
    row = np.array([0, 12, 3252, 99999])
    col = np.array([34, 5, 0, 7])
    ids = format_barcodes(row, col, 8)
    assert ids.to_pylist() == ["s_008um_00000_00034-1", "s_008um_00012_00005-1",
                               "s_008um_03252_00000-1", "s_008um_99999_00007-1"]
    parsed_row, parsed_col, ok = parse_barcodes(np.array(ids.to_pylist(), "S21"), 8)
    assert ok.all() and (parsed_row == row).all() and (parsed_col == col).all()
    assert len(format_barcodes(row[:0], col[:0], 2)) == 0
