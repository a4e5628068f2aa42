"""MERSCOPE adapter: real fixtures, synthetic region folders end to end, bad input."""

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
from histmol.errors import BundleError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide
from histmol.synth.merscope import write_merscope_bundle
from platform_adapters import merscope

CONFIG = BuildConfig(patch_px=64)
BIG_ID = "110883424764611924400221639916314253469"  # 39 digits: beyond int64 and float64

# -- a tiny hand-written region folder -------------------------------------------------------

CELL_BY_GENE = f"cell,Gapdh,Actb,Blank-1\n{BIG_ID},3,0,1\n12,0,5,0\n13,2,2,2\n"
CELL_METADATA = (
    ",fov,volume,center_x,center_y,min_x,max_x,min_y,max_y\n"
    f"{BIG_ID},0,400.5,100.25,2000.5,95.0,105.0,1995.0,2006.0\n"
    "12,0,300.0,130.0,2010.0,126.0,134.0,2004.0,2016.0\n"
    "13,1,350.0,300.0,1900.0,295.0,305.0,1895.0,1905.0\n"
)
TRANSCRIPTS = (
    ",barcode_id,global_x,global_y,global_z,x,y,fov,gene,transcript_id,cell_id\n"
    "0,0,100.5,2001.0,3.0,10.0,20.0,0,Gapdh,ENST1,12\n"
    "1,0,102.0,2003.5,3.0,24.0,43.0,0,Gapdh,ENST1,12\n"
    "2,2,300.0,1900.0,1.0,5.0,6.0,1,Blank-1,,-1\n"
)
TRANSFORM = "9.259259 0.0 -800.0\n0.0 9.259259 -17000.0\n0.0 0.0 1.0\n"


def write_region(
    folder: Path,
    *,
    by_gene: str = CELL_BY_GENE,
    meta: str = CELL_METADATA,
    transform: str = TRANSFORM,
) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "cell_by_gene.csv").write_text(by_gene)
    (folder / "cell_metadata.csv").write_text(meta)
    (folder / "detected_transcripts.csv").write_text(TRANSCRIPTS)
    (folder / "images" / "micron_to_mosaic_pixel_transform.csv").write_text(transform)
    return folder


class TestMerscopeContract(AdapterContract):
    platform = "merscope"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        return write_region(tmp_path / "region_0"), {"units": "bins"}


def test_hand_written_cells(tmp_path: Path) -> None:
    section = merscope.read(write_region(tmp_path / "region_0"), wsi="he.tif")
    assert section.units["unit_id"].tolist() == [BIG_ID, "12", "13"]  # ids kept as text
    assert section.units["x_native"].tolist() == [100.25, 130.0, 300.0]
    assert section.units["y_native"].tolist() == [2000.5, 2010.0, 1900.0]
    assert section.units["volume"].tolist() == [400.5, 300.0, 350.0]
    assert section.genes["feature"].tolist() == ["Gapdh", "Actb"]
    assert section.genes["gene_id"].tolist() == ["ENSMUSG00000057666", "ENSMUSG00000029580"]
    np.testing.assert_array_equal(section.counts.toarray(), [[3, 0], [0, 5], [2, 2]])
    assert section.control_counts["blank"].tolist() == [1, 0, 2]
    assert section.qc["mosaic_px_per_um"] == pytest.approx(9.259259)
    assert section.qc["mosaic_offset_y_px"] == -17000.0
    assert section.native_to_wsi is None  # the mosaic transform does not place the H&E
    assert section.unit_size_um == 10.0 and section.unit_shape == "circle"
    assert section.qc["unit_size_source"] == "median_bounding_box"


def test_hand_written_bins(tmp_path: Path) -> None:
    section = merscope.read(
        write_region(tmp_path / "region_0"), wsi="he.tif", units="bins", bin_um=10.0
    )
    assert section.units["unit_id"].tolist() == ["bin10_10_200"]  # the Blank-only bin dropped
    assert (section.units["x_native"][0], section.units["y_native"][0]) == (105.0, 2005.0)
    assert section.counts.toarray().tolist() == [[2]]
    assert section.qc["n_bins_controls_only"] == 1 and section.qc["n_transcripts"] == 3


# -- real fixtures ----------------------------------------------------------------------------


def test_ovarian_subset_written_by_r() -> None:
    folder = fixture_path("merscope_ovarian_p2s2_subset/VizgenMERSCOPE")
    section = merscope.read(folder, wsi=folder / "he.tif")
    assert (section.n_units, section.n_genes) == (450, 18)
    assert section.qc["cell_match_rate"] == 1.0
    # read.csv/write.csv turned "Blank-19" into "Blank.19" and "HLA-DQA1" into "HLA.DQA1"
    assert section.qc["n_names_unmangled"] == 4
    assert {"HLA-DQA1", "HLA-DRA"} <= set(section.genes["symbol"])
    assert int(section.control_counts["blank"].sum()) == 46
    assert int(section.counts.sum()) + 46 == 16254
    meta = pd.read_csv(folder / "small_cell_metadata.csv", dtype={"X": str}).set_index("X")
    units = section.units.set_index("unit_id")
    np.testing.assert_array_equal(units["x_native"], meta.loc[units.index, "center_x"])
    np.testing.assert_array_equal(units["y_native"], meta.loc[units.index, "center_y"])
    assert units.loc["7680", "x_native"] == 10087.6125569536


def test_mouse_brain_transcripts_binned_exactly() -> None:
    folder = fixture_path("merscope_giotto_mousebrain/Raw")
    path = folder / "vizgen_transcripts.gz"
    with pytest.raises(BundleError, match=r"no \*detected_transcripts.csv"):
        merscope.read(folder, wsi="he.tif", units="bins")
    section = merscope.read(folder, wsi="he.tif", units="bins", transcripts=path)
    assert section.qc["n_transcripts"] == 80343 and section.qc["n_targets"] == 559
    assert (section.n_genes, section.qc["n_control_probes"]) == (450, 109)
    tx = pd.read_csv(path)
    genes = ~tx["gene"].str.startswith("Blank-")
    assert int(section.counts.sum()) == int(genes.sum()) == 80006
    assert int(section.control_counts["blank"].sum()) == 337
    key = [
        np.floor(tx["global_x"] / 8.0).astype(int)[genes],
        np.floor(tx["global_y"] / 8.0).astype(int)[genes],
        tx["gene"][genes],
    ]
    expected = tx[genes].groupby(key).size().sort_index()
    coo = section.counts.tocsr().tocoo()
    got = pd.Series(
        coo.data,
        index=pd.MultiIndex.from_arrays(
            [
                section.units["bin_col"].to_numpy()[coo.row],
                section.units["bin_row"].to_numpy()[coo.row],
                section.genes["symbol"].to_numpy()[coo.col],
            ]
        ),
    ).sort_index()
    assert got.index.equals(expected.index)
    np.testing.assert_array_equal(got.to_numpy(), expected.to_numpy())


# -- synthetic region end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth]:
    root = tmp_path_factory.mktemp("merscope")
    slide = make_slide(root / "slide.tif", width_um=700.0, height_um=600.0, mpp=0.5, seed=6)
    return slide, write_merscope_bundle(root / "run", slide, seed=6)


def gene_columns(truth: GroundTruth) -> np.ndarray:
    return np.flatnonzero((truth.genes["feature_type"] == "Gene Expression").to_numpy())


def stored(out: Path) -> tuple[pd.DataFrame, pd.Series]:
    manifest = pd.read_parquet(out / "manifest.parquet")
    units = pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])
    return units, pd.read_parquet(out / "sections.parquet").iloc[0]


def test_synthetic_region_reads_exactly(region: tuple[SyntheticSlide, GroundTruth]) -> None:
    _, truth = region
    section = merscope.read(truth.bundle, wsi="he.tif")
    assert section.units["unit_id"].tolist() == truth.unit_ids.tolist()
    np.testing.assert_array_equal(section.units["x_native"], truth.x_native)
    np.testing.assert_array_equal(section.units["y_native"], truth.y_native)
    np.testing.assert_array_equal(
        section.counts.toarray(), truth.counts.toarray()[:, gene_columns(truth)]
    )
    blanks = truth.counts.toarray()[:, len(gene_columns(truth)) :].sum(axis=1)
    np.testing.assert_array_equal(section.control_counts["blank"], blanks)
    assert section.qc["mosaic_px_per_um"] == pytest.approx(1 / 0.108)


def test_synthetic_cells_end_to_end(
    region: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = region
    request = SectionRequest("merscope", truth.bundle, slide.path, "ms-1", truth.transform_path)
    build_section(request, tmp_path / "corpus", CONFIG)
    units, row = stored(tmp_path / "corpus")
    assert len(units) + row["qc_n_units_dropped_tissue"] == len(truth.unit_ids)
    index = pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids)
    rows = index.loc[units["unit_id"]].to_numpy()
    np.testing.assert_allclose(units["x_wsi_px"], truth.x_wsi_px[rows], atol=1e-6)
    np.testing.assert_allclose(units["y_wsi_px"], truth.y_wsi_px[rows], atol=1e-6)
    dense = truth.counts.toarray()
    symbols = truth.genes["symbol"].to_numpy()
    column = truth_columns(symbols, symbols)  # stable gene index -> truth column
    for record, r in zip(units.itertuples(), rows, strict=True):
        names = symbols[column.loc[np.asarray(record.gene_idx)].to_numpy()]
        got = dict(zip(names, record.counts, strict=True))
        expected = {
            s: v
            for s, v in zip(
                symbols[gene_columns(truth)], dense[r, gene_columns(truth)], strict=True
            )
            if v
        }
        assert got == expected
    assert row["control_blank_total"] == int(dense[:, len(gene_columns(truth)) :].sum())


def test_synthetic_bins_end_to_end_with_landmarks(
    region: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = region
    request = SectionRequest(
        "merscope",
        truth.bundle,
        slide.path,
        "ms-2",
        options={"units": "bins"},
        landmarks=truth.extra["landmarks_path"],
    )
    build_section(request, tmp_path / "corpus", CONFIG)
    units, row = stored(tmp_path / "corpus")
    tx = truth.extra["transcripts"]
    genes = ~tx["gene"].str.startswith("Blank-")
    bins = pd.DataFrame(
        {
            "col": np.floor(tx["x_um"] / 8.0).astype(int),
            "row": np.floor(tx["y_um"] / 8.0).astype(int),
        }
    )[genes]
    per_bin = bins.groupby(["col", "row"]).size()
    assert len(units) + row["qc_n_units_dropped_tissue"] == len(per_bin) == row["n_units_read"]
    keys = units["unit_id"].str.extract(r"bin8_(?P<col>-?\d+)_(?P<row>-?\d+)").astype(int)
    totals = np.array([int(np.sum(c)) for c in units["counts"]])
    np.testing.assert_array_equal(totals, per_bin.loc[pd.MultiIndex.from_frame(keys)].to_numpy())
    m = truth.native_to_wsi
    cx, cy = (keys["col"].to_numpy() + 0.5) * 8.0, (keys["row"].to_numpy() + 0.5) * 8.0
    # the landmark fit carries the 1 px click noise of landmarks.csv
    np.testing.assert_allclose(units["x_wsi_px"], m[0, 0] * cx + m[0, 1] * cy + m[0, 2], atol=1.5)
    np.testing.assert_allclose(units["y_wsi_px"], m[1, 0] * cx + m[1, 1] * cy + m[1, 2], atol=1.5)
    assert row["qc_landmark_pairs"] == 8
    assert 0 < row["qc_landmark_rms_um"] < 1.0 and row["qc_landmark_max_um"] < 2.0


# -- malformed input --------------------------------------------------------------------------


def test_missing_cell_metadata_names_the_folder(tmp_path: Path) -> None:
    folder = write_region(tmp_path / "region_0")
    (folder / "cell_metadata.csv").unlink()
    with pytest.raises(BundleError, match=r"no \*cell_metadata.csv\[.gz\] found") as err:
        merscope.read(folder, wsi="he.tif")
    assert str(folder) in str(err.value)


def test_renamed_column_names_the_file(tmp_path: Path) -> None:
    folder = write_region(tmp_path / "region_0", meta=CELL_METADATA.replace("center_x", "cx"))
    with pytest.raises(BundleError, match=r"lacks columns \['center_x'\]") as err:
        merscope.read(folder, wsi="he.tif")
    assert str(folder / "cell_metadata.csv") in str(err.value)


def test_entity_id_mismatch_under_the_threshold(tmp_path: Path) -> None:
    meta = CELL_METADATA.replace("\n12,", "\n99,").replace("\n13,", "\n98,")
    folder = write_region(tmp_path / "region_0", meta=meta)
    with pytest.raises(BundleError, match=r"only 1 of 3 cells \(EntityID\) \(33.33%\)") as err:
        merscope.read(folder, wsi="he.tif")
    assert "cell_by_gene.csv" in str(err.value) and "cell_metadata.csv" in str(err.value)


def test_swapped_centre_columns_are_caught_by_the_boxes(tmp_path: Path) -> None:
    header = ",fov,volume,center_y,center_x,min_x,max_x,min_y,max_y"  # x and y swapped
    meta = CELL_METADATA.replace(CELL_METADATA.splitlines()[0], header)
    folder = write_region(tmp_path / "region_0", meta=meta)
    with pytest.raises(BundleError, match=r"center_x lies outside \[min_x, max_x\] for 3 cells"):
        merscope.read(folder, wsi="he.tif")


def test_mirrored_mosaic_transform_is_refused(tmp_path: Path) -> None:
    folder = write_region(
        tmp_path / "region_0", transform=TRANSFORM.replace("0.0 9.259259", "0.0 -9.259259")
    )
    with pytest.raises(BundleError, match="mirrors the frame") as err:
        merscope.read(folder, wsi="he.tif")
    assert "micron_to_mosaic_pixel_transform.csv" in str(err.value)


def test_non_integer_counts_are_refused(
    region: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    _, truth = region
    folder = Path(shutil.copytree(truth.bundle, tmp_path / "region"))
    table = pd.read_csv(folder / "cell_by_gene.csv", dtype={"cell": str})
    gene = table.columns[1]
    table[gene] = table[gene].astype(float)
    table.loc[0, gene] = 0.5
    table.to_csv(folder / "cell_by_gene.csv", index=False)
    where = rf"unit row 0 \({table.iloc[0, 0]}\), feature column 0 \({gene}\)"
    with pytest.raises(BundleError, match=rf"{where}: count 0.5 is not an integer") as err:
        merscope.read(folder, wsi="he.tif")
    assert "cell_by_gene.csv" in str(err.value)
