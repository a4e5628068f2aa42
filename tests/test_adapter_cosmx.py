"""CosMx adapter: real flat-file fixtures, synthetic legacy/AtoMx bundles end to end, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from adapter_contract import AdapterContract, BundleCase
from conftest import fixture_path
from gene_space_helpers import truth_columns

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide
from histmol.synth.cosmx import write_cosmx_bundle
from platform_adapters import cosmx

CONFIG = BuildConfig(patch_px=64)

# -- a tiny hand-written legacy bundle -------------------------------------------------------

FOVS = "fov,x_global_px,y_global_px\n1,1000.5,150000.0\n2,6472.7,150000.0\n"
EXPR = (
    "fov,cell_ID,GAPDH,ACTB,NegPrb1,NegPrb2\n"
    "1,0,4,1,2,0\n"  # background: transcripts outside every cell
    "1,1,3,0,1,0\n"
    "1,2,0,5,0,1\n"
    "2,1,7,2,0,0\n"
)
META = (
    "fov,cell_ID,Area,CenterX_local_px,CenterY_local_px,CenterX_global_px,CenterY_global_px\n"
    "1,1,2000,100,200,1100.5,150200.0\n"
    "1,2,1500,5000,30,6000.5,150030.0\n"
    "2,1,2500,40,3000,6512.7,153000.0\n"
)
TX = (
    "fov,cell_ID,x_global_px,y_global_px,x_local_px,y_local_px,z,target,CellComp\n"
    "1,1,1100.5,150200.0,100.0,200.0,3,GAPDH,Nuclear\n"
    "1,1,1130.5,150210.0,130.0,210.0,3,GAPDH,Nuclear\n"  # 30 px = 5.4 um: same 8 um bin
    "1,0,5000.5,150001.0,4000.0,1.0,2,NegPrb1,0\n"
    "2,1,6512.7,153000.0,40.0,3000.0,1,ACTB,Nuclear\n"
)


def write_flat_files(
    folder: Path, *, expr: str = EXPR, meta: str = META, tx: str = TX, fovs: str | None = FOVS
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Run1_exprMat_file.csv").write_text(expr)
    (folder / "Run1_metadata_file.csv").write_text(meta)
    (folder / "Run1_tx_file.csv").write_text(tx)
    if fovs is not None:
        (folder / "Run1_fov_positions_file.csv").write_text(fovs)
    return folder


class TestCosmxContract(AdapterContract):
    platform = "cosmx"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        return write_flat_files(tmp_path / "run1"), {"units": "bins"}


def test_hand_written_cells(tmp_path: Path) -> None:
    section = cosmx.read(write_flat_files(tmp_path / "run1"), wsi="he.tif")
    assert section.units["unit_id"].tolist() == ["1_1", "1_2", "2_1"]
    # legacy FOV grid 5472 px wide (local x 5000): the Dash instrument's 0.18 um/px
    assert section.qc["px_size_source"] == "dash_fov_width" and section.qc["px_size_um"] == 0.18
    np.testing.assert_array_equal(
        section.units["x_native"], np.array([1100.5, 6000.5, 6512.7]) * 0.18
    )
    # the global frame's y axis points up: the native (image) frame turns it down
    np.testing.assert_array_equal(
        section.units["y_native"], -np.array([150200.0, 150030.0, 153000.0]) * 0.18
    )
    np.testing.assert_array_equal(section.counts.toarray(), [[3, 0], [0, 5], [7, 2]])
    assert section.genes["feature"].tolist() == ["GAPDH", "ACTB"]
    assert section.genes["gene_id"].tolist() == ["ENSG00000111640", "ENSG00000075624"]
    np.testing.assert_array_equal(section.control_counts["negative_probe"], [1, 1, 0])
    assert section.qc["n_background_rows"] == 1 and section.qc["background_counts"] == 7
    assert section.qc["layout"] == "legacy" and section.qc["global_y_sign"] == 1.0
    np.testing.assert_array_equal(
        section.units["area_um2"], np.array([2000, 1500, 2500]) * 0.18 * 0.18
    )
    assert section.unit_shape == "circle" and section.pitch_um is None
    assert section.unit_size_um == pytest.approx(2 * np.sqrt(2000 * 0.18**2 / np.pi))


def test_hand_written_bins_and_pixel_size_override(tmp_path: Path) -> None:
    folder = write_flat_files(tmp_path / "run1")
    section = cosmx.read(folder, wsi="he.tif", units="bins", px_size_um=0.12028)
    assert section.qc["px_size_source"] == "user"
    # GAPDH x2 share a bin; the NegPrb-only bin is dropped and counted; ACTB in its own bin.
    # Bins come sorted by (row, col): the ACTB bin (y further up, so smaller) first.
    assert section.qc["n_bins_controls_only"] == 1 and section.n_units == 2
    assert section.genes["feature"].tolist() == ["GAPDH", "ACTB"]  # order of first appearance
    assert section.counts.toarray().tolist() == [[0, 1], [2, 0]]
    col, row = np.floor(1100.5 * 0.12028 / 8.0), np.floor(-150210.0 * 0.12028 / 8.0)
    gapdh = section.units.iloc[1]
    assert (gapdh["bin_col"], gapdh["bin_row"]) == (col, row) == (16, -2259)
    assert (gapdh["x_native"], gapdh["y_native"]) == ((col + 0.5) * 8.0, (row + 0.5) * 8.0)
    assert section.units["unit_id"].tolist() == ["bin8_97_-2301", "bin8_16_-2259"]
    assert section.qc["n_transcripts"] == 4 and section.qc["n_targets"] == 3
    with pytest.raises(ConfigError, match="units must be"):
        cosmx.read(folder, wsi="he.tif", units="spots")  # type: ignore[arg-type]


# -- real fixtures ----------------------------------------------------------------------------


def test_lung9_rep1_background_row_is_reported_not_a_crash() -> None:
    folder = fixture_path("cosmx_lung_p9s1_subset/NanostringCosMx")
    section = cosmx.read(folder, wsi=folder / "he.tif")
    # exprMat has 454 rows, metadata 453: the extra one is fov 2's cell_ID 0 background row.
    assert section.qc["n_expression_rows"] == 454 and section.qc["n_metadata_rows"] == 453
    assert section.qc["n_background_rows"] == 1 and section.qc["background_counts"] == 3895
    assert section.qc["cell_match_rate"] == 1.0
    assert (section.n_units, section.n_genes) == (453, 20)
    assert int(section.counts.sum()) == 1432
    assert section.qc["layout"] == "legacy" and section.qc["px_size_um"] == 0.18
    cell = section.units.set_index("unit_id").loc["1_5001"]
    assert (cell["x_native"], cell["y_native"]) == (5229.333333 * 0.18, -137685.5556 * 0.18)
    assert cell["area_um2"] == 3347 * 0.18 * 0.18


def test_lung_p9s1_negative_probes() -> None:
    folder = fixture_path("cosmx_lung_p9s1_subset/NanostringCosMx_HumanLung_P9S1_Small")
    section = cosmx.read(folder, wsi=folder / "he.tif")
    assert (section.n_units, section.n_genes) == (9233, 960)
    assert section.qc["n_control_probes"] == 20 and section.qc["n_fovs"] == 2
    assert int(section.control_counts["negative_probe"].sum()) == 6982
    assert int(section.counts.sum()) + 6982 == 1849950  # every count of the file is accounted
    assert not section.genes["symbol"].str.startswith("NegPrb").any()
    assert section.qc["global_x_sign"] == 1.0 and section.qc["global_y_sign"] == 1.0


def test_lung12_transcripts_binned_exactly() -> None:
    folder = fixture_path("cosmx_giotto_lung12/Raw")
    with pytest.raises(BundleError, match="units='bins'"):
        cosmx.read(folder, wsi=folder / "he.tif")  # no exprMat / metadata here
    section = cosmx.read(folder, wsi=folder / "he.tif", units="bins")
    assert section.qc["n_transcripts"] == 25825 and section.qc["n_targets"] == 980
    assert section.qc["layout"] == "legacy" and section.qc["px_size_um"] == 0.18
    assert (section.n_units, section.n_genes, section.qc["n_control_probes"]) == (464, 960, 20)
    tx = pd.read_csv(folder / "Lung12_tx_file.csv")
    col = np.floor(tx["x_global_px"] * 0.18 / 8.0).astype(int)
    row = np.floor(-tx["y_global_px"] * 0.18 / 8.0).astype(int)
    genes = ~tx["target"].str.startswith("NegPrb")
    expected = tx[genes].groupby([col[genes], row[genes], tx["target"][genes]]).size()
    symbols = section.genes["feature"].to_numpy()
    coo = section.counts.tocsr().tocoo()
    units = section.units
    got = pd.Series(
        coo.data,
        index=pd.MultiIndex.from_arrays(
            [
                units["bin_col"].to_numpy()[coo.row],
                units["bin_row"].to_numpy()[coo.row],
                symbols[coo.col],
            ]
        ),
    ).sort_index()
    np.testing.assert_array_equal(got.to_numpy(), expected.sort_index().to_numpy())
    assert got.index.equals(expected.sort_index().index)
    assert int(section.control_counts["negative_probe"].sum()) == int((~genes).sum()) == 275


# -- synthetic bundles end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    root = tmp_path_factory.mktemp("cosmx_slide")
    return make_slide(root / "slide.tif", width_um=800.0, height_um=600.0, mpp=0.5, seed=4)


@pytest.fixture(scope="module")
def atomx(slide: SyntheticSlide, tmp_path_factory: pytest.TempPathFactory) -> GroundTruth:
    return write_cosmx_bundle(tmp_path_factory.mktemp("atomx"), slide, layout="atomx", seed=4)


@pytest.fixture(scope="module")
def legacy(slide: SyntheticSlide, tmp_path_factory: pytest.TempPathFactory) -> GroundTruth:
    return write_cosmx_bundle(tmp_path_factory.mktemp("legacy"), slide, layout="legacy", seed=5)


def gene_columns(truth: GroundTruth) -> np.ndarray:
    return np.flatnonzero((truth.genes["feature_type"] == "Gene Expression").to_numpy())


@pytest.mark.parametrize("layout", ["atomx", "legacy"])
def test_synthetic_cells_read_exactly(layout: str, request: pytest.FixtureRequest) -> None:
    truth: GroundTruth = request.getfixturevalue(layout)
    section = cosmx.read(truth.bundle, wsi="he.tif")
    assert section.qc["layout"] == layout
    assert section.qc["px_size_um"] == {"atomx": 0.12028, "legacy": 0.18}[layout]
    assert section.qc["global_y_sign"] == {"atomx": -1.0, "legacy": 1.0}[layout]
    assert section.units["unit_id"].tolist() == truth.unit_ids.tolist()
    np.testing.assert_array_equal(section.units["x_native"], truth.x_native)
    np.testing.assert_array_equal(section.units["y_native"], truth.y_native)
    np.testing.assert_array_equal(
        section.counts.toarray(), truth.counts.toarray()[:, gene_columns(truth)]
    )
    controls = truth.counts.toarray()[:, len(gene_columns(truth)) :]
    assert int(section.control_counts.to_numpy().sum()) == int(controls.sum())
    background = section.qc["n_background_rows"]
    assert background == {"atomx": 0, "legacy": 2}[layout]


def stored(out: Path) -> tuple[pd.DataFrame, pd.Series]:
    manifest = pd.read_parquet(out / "manifest.parquet")
    units = pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])
    return units, pd.read_parquet(out / "sections.parquet").iloc[0]


def test_synthetic_cells_end_to_end(
    atomx: GroundTruth, slide: SyntheticSlide, tmp_path: Path
) -> None:
    request = SectionRequest("cosmx", atomx.bundle, slide.path, "cx-1", atomx.transform_path)
    build_section(request, tmp_path / "corpus", CONFIG)
    units, row = stored(tmp_path / "corpus")
    assert len(units) + row["qc_n_units_dropped_tissue"] == len(atomx.unit_ids)
    index = pd.Series(np.arange(len(atomx.unit_ids)), index=atomx.unit_ids)
    rows = index.loc[units["unit_id"]].to_numpy()
    np.testing.assert_allclose(units["x_wsi_px"], atomx.x_wsi_px[rows], atol=1e-6)
    np.testing.assert_allclose(units["y_wsi_px"], atomx.y_wsi_px[rows], atol=1e-6)
    truth = atomx.counts.toarray()
    symbols = atomx.genes["symbol"].to_numpy()
    column = truth_columns(symbols, symbols)  # stable gene index -> truth column
    for record, r in zip(units.itertuples(), rows, strict=True):
        names = symbols[column.loc[np.asarray(record.gene_idx)].to_numpy()]
        got = dict(zip(names, record.counts, strict=True))
        expected = {
            s: v
            for s, v in zip(
                symbols[gene_columns(atomx)], truth[r, gene_columns(atomx)], strict=True
            )
            if v
        }
        assert got == expected
    dropped = np.setdiff1d(np.arange(len(rows) + row["qc_n_units_dropped_tissue"]), rows)
    total = sum(int(np.sum(c)) for c in units["counts"])
    assert total == int(truth[:, gene_columns(atomx)].sum()) - int(
        truth[dropped][:, gene_columns(atomx)].sum()
    )
    assert row["qc_layout"] == "atomx" and row["unit_shape"] == "circle"


def test_synthetic_bins_end_to_end(
    legacy: GroundTruth, slide: SyntheticSlide, tmp_path: Path
) -> None:
    request = SectionRequest(
        "cosmx", legacy.bundle, slide.path, "cx-2", legacy.transform_path, options={"units": "bins"}
    )
    build_section(request, tmp_path / "corpus", CONFIG)
    units, row = stored(tmp_path / "corpus")
    tx = legacy.extra["transcripts"]
    genes = ~tx["target"].str.startswith("NegPrb")
    bins = pd.DataFrame(
        {
            "col": np.floor(tx["x_um"] / 8.0).astype(int),
            "row": np.floor(tx["y_um"] / 8.0).astype(int),
        }
    )[genes]
    per_bin = bins.groupby(["col", "row"]).size()
    assert row["n_units_read"] == len(per_bin)
    assert len(units) + row["qc_n_units_dropped_tissue"] == len(per_bin)
    stored_bins = units["unit_id"].str.extract(r"bin8_(?P<col>-?\d+)_(?P<row>-?\d+)").astype(int)
    keys = pd.MultiIndex.from_frame(stored_bins)
    totals = np.array([int(np.sum(c)) for c in units["counts"]])
    np.testing.assert_array_equal(totals, per_bin.loc[keys].to_numpy())
    centre_x = (stored_bins["col"].to_numpy() + 0.5) * 8.0
    centre_y = (stored_bins["row"].to_numpy() + 0.5) * 8.0
    m = legacy.native_to_wsi
    np.testing.assert_allclose(
        units["x_wsi_px"], m[0, 0] * centre_x + m[0, 1] * centre_y + m[0, 2], atol=1e-6
    )
    assert row["unit_shape"] == "square" and row["qc_n_bins_controls_only"] >= 0


# -- malformed input --------------------------------------------------------------------------


def copy_bundle(truth: GroundTruth, tmp_path: Path) -> Path:
    return Path(shutil.copytree(truth.bundle, tmp_path / truth.bundle.name))


def test_missing_expression_matrix_names_the_folder(legacy: GroundTruth, tmp_path: Path) -> None:
    folder = copy_bundle(legacy, tmp_path)
    (folder / "synthetic_cosmx_exprMat_file.csv").unlink()
    with pytest.raises(BundleError, match=r"no \*_exprMat_file.csv\[.gz\] found") as err:
        cosmx.read(folder, wsi="he.tif")
    assert str(folder) in str(err.value)


def test_renamed_columns_name_the_file(legacy: GroundTruth, tmp_path: Path) -> None:
    folder = copy_bundle(legacy, tmp_path)
    meta = folder / "synthetic_cosmx_metadata_file.csv"
    meta.write_text(meta.read_text().replace("cell_ID", "cellID", 1))
    with pytest.raises(BundleError, match=r"lacks columns \['cell_ID'\]") as err:
        cosmx.read(folder, wsi="he.tif")
    assert str(meta) in str(err.value)
    tx = folder / "synthetic_cosmx_tx_file.csv"
    tx.write_text(tx.read_text().replace(",target,", ",gene,", 1))
    with pytest.raises(BundleError, match=r"lacks columns \['target'\]") as err:
        cosmx.read(folder, wsi="he.tif", units="bins")
    assert str(tx) in str(err.value)


def test_cell_id_mismatch_under_the_threshold(legacy: GroundTruth, tmp_path: Path) -> None:
    folder = copy_bundle(legacy, tmp_path)
    meta = folder / "synthetic_cosmx_metadata_file.csv"
    table = pd.read_csv(meta)
    table[table["fov"] == 1].to_csv(meta, index=False)  # fov 2's cells lost from the metadata
    with pytest.raises(BundleError, match=r"cells \(fov, cell_ID\) .* have a position") as err:
        cosmx.read(folder, wsi="he.tif")
    assert "exprMat_file.csv" in str(err.value) and "metadata_file.csv" in str(err.value)
    kept = cosmx.read(folder, wsi="he.tif", min_match_rate=0.1)
    assert kept.qc["n_matched_cells"] == int((table["fov"] == 1).sum())


def test_swapped_global_axes_are_refused(legacy: GroundTruth, tmp_path: Path) -> None:
    folder = copy_bundle(legacy, tmp_path)
    meta = folder / "synthetic_cosmx_metadata_file.csv"
    table = pd.read_csv(meta)
    table[["CenterX_global_px", "CenterY_global_px"]] = table[
        ["CenterY_global_px", "CenterX_global_px"]
    ].to_numpy()
    table.to_csv(meta, index=False)
    with pytest.raises(BundleError, match="not a translation of its local coordinate") as err:
        cosmx.read(folder, wsi="he.tif")
    assert str(meta) in str(err.value)


def test_global_centres_rebuilt_from_fov_positions(atomx: GroundTruth, tmp_path: Path) -> None:
    folder = copy_bundle(atomx, tmp_path)
    meta = folder / "synthetic_cosmx_metadata_file.csv"
    table = pd.read_csv(meta)
    table.drop(columns=["CenterX_global_px", "CenterY_global_px"]).to_csv(meta, index=False)
    section = cosmx.read(folder, wsi="he.tif")
    assert section.qc["centres_source"] == "fov_positions_plus_local"
    # AtoMx: y_global = y_fov - y_local, the rounded values of the written globals
    np.testing.assert_allclose(section.units["x_native"], atomx.x_native, atol=0.5 * 0.12028)
    np.testing.assert_allclose(section.units["y_native"], atomx.y_native, atol=0.5 * 0.12028)
    (folder / "synthetic_cosmx_fov_positions_file.csv").unlink()
    with pytest.raises(BundleError, match="no \\*_fov_positions_file.csv") as err:
        cosmx.read(folder, wsi="he.tif")
    assert str(meta) in str(err.value)
