"""Slide-seq adapter: real spacexr fixture, synthetic pucks end to end, Curio h5ad, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from adapter_contract import AdapterContract, BundleCase
from conftest import fixture_path

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide
from histmol.synth.slide_seq import write_slide_seq_bundle
from platform_adapters import slide_seq

CONFIG = BuildConfig(patch_px=64)

# -- a tiny hand-written spacexr bundle ------------------------------------------------------

BEADS = [("AAAC", 100.0, 200.0), ("AAAG", 120.0, 205.5), ("AACC", 90.5, 230.0), ("ACCA", 10, 20)]
GENES = ["Gapdh", "Actb", "Mbp"]
# genes x beads (first three beads; ACCA has a location but no counts)
DGE = np.array([[3, 0, 1], [0, 5, 2], [7, 1, 0]])


def write_spacexr(
    folder: Path,
    *,
    dge: np.ndarray = DGE,
    beads: list | None = None,
    header: str = "barcodes,xcoord,ycoord",
    transpose: bool = False,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{b},{x},{y}" for b, x, y in (BEADS if beads is None else beads)]
    (folder / "BeadLocationsForR.csv").write_text("\n".join([header, *rows]) + "\n")
    barcodes = [b for b, _, _ in BEADS[: dge.shape[1]]]
    if transpose:  # beads x genes
        lines = ['"",' + ",".join(f'"{g}"' for g in GENES)]
        lines += [
            f'"{b}",' + ",".join(map(str, col)) for b, col in zip(barcodes, dge.T, strict=True)
        ]
    else:
        lines = ['"",' + ",".join(f'"{b}"' for b in barcodes)]
        lines += [f'"{g}",' + ",".join(map(str, row)) for g, row in zip(GENES, dge, strict=True)]
    (folder / "MappedDGEForR.csv").write_text("\n".join(lines) + "\n")
    return folder


class TestSlideSeqContract(AdapterContract):
    platform = "slide-seq"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        # the contract checks metadata round-trips exactly, so the adjacent flag is off here
        return write_spacexr(tmp_path / "puck_01"), {"adjacent_section": False}


def test_hand_written_bundle(tmp_path: Path) -> None:
    section = slide_seq.read(write_spacexr(tmp_path / "puck"), wsi="he.tif")
    assert section.units["unit_id"].tolist() == ["AAAC", "AAAG", "AACC"]
    np.testing.assert_array_equal(section.units["x_native"], np.array([100.0, 120.0, 90.5]) * 0.65)
    np.testing.assert_array_equal(section.units["y_native"], np.array([200.0, 205.5, 230.0]) * 0.65)
    assert section.units["x_coordinate"].tolist() == [100.0, 120.0, 90.5]
    np.testing.assert_array_equal(section.counts.toarray(), DGE.T)
    assert section.genes["feature"].tolist() == GENES
    assert section.metadata == {"adjacent_section": "true"}
    assert (section.unit_shape, section.unit_size_um, section.pitch_um) == ("circle", 10.0, None)
    assert section.native_um_per_unit == 1.0 and section.native_to_wsi is None
    assert section.qc["n_location_beads"] == 4 and section.qc["bead_match_rate"] == 1.0
    scaled = slide_seq.read(tmp_path / "puck", wsi="he.tif", um_per_coordinate=1.0)
    assert scaled.units["x_native"].tolist() == [100.0, 120.0, 90.5]
    with pytest.raises(ConfigError, match="um_per_coordinate"):
        slide_seq.read(tmp_path / "puck", wsi="he.tif", um_per_coordinate=0)


def test_drop_seq_digital_expression_gz(tmp_path: Path) -> None:
    folder = write_spacexr(tmp_path / "puck")
    (folder / "MappedDGEForR.csv").unlink()
    lines = ["GENE\tAAAC\tAAAG\tAACC"]
    lines += [g + "\t" + "\t".join(map(str, row)) for g, row in zip(GENES, DGE, strict=True)]
    (folder / "Puck_01.digital_expression.txt.gz").write_bytes(
        gzip.compress(("\n".join(lines) + "\n").encode())
    )
    section = slide_seq.read(folder, wsi="he.tif")
    assert section.units["unit_id"].tolist() == ["AAAC", "AAAG", "AACC"]
    np.testing.assert_array_equal(section.counts.toarray(), DGE.T)
    assert section.provenance.files[1].endswith("Puck_01.digital_expression.txt.gz")


# -- real fixture: spacexr's Slide-seq cerebellum vignette -------------------------------------

VIGNETTE = "slideseq_spacexr_cerebellum/SpatialRNA/Vignette"


def test_spacexr_cerebellum_vignette() -> None:
    folder = fixture_path(VIGNETTE)
    section = slide_seq.read(folder, wsi=folder / "he.tif", section_id="cerebellum")
    assert (section.n_units, section.n_genes) == (100, 378)
    assert int(section.counts.sum()) == 15246
    assert section.qc["dge_orientation"] == "genes_x_beads"
    assert section.qc["bead_match_rate"] == 1.0 and section.qc["n_control_probes"] == 0
    beads = pd.read_csv(folder / "BeadLocationsForR.csv").set_index("barcodes")
    dge = pd.read_csv(folder / "MappedDGEForR.csv", index_col=0)
    units = section.units.set_index("unit_id")
    assert units.loc["TTGGACGTTTCAAT", "x_coordinate"] == 3411.272727
    assert units.loc["TTGGACGTTTCAAT", "x_native"] == 3411.272727 * 0.65
    np.testing.assert_array_equal(units["y_native"], beads.loc[units.index, "ycoord"] * 0.65)
    assert section.genes["feature"].tolist() == dge.index.tolist()
    np.testing.assert_array_equal(section.counts.toarray(), dge[units.index].to_numpy().T)


# -- synthetic pucks end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def puck(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth]:
    root = tmp_path_factory.mktemp("slide_seq")
    slide = make_slide(root / "slide.tif", width_um=600.0, height_um=500.0, mpp=0.5, seed=2)
    return slide, write_slide_seq_bundle(root / "spacexr", slide, seed=2, n_genes=40)


def stored_units(out: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(out / "manifest.parquet")
    return pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])


def test_synthetic_puck_reads_exactly(puck: tuple[SyntheticSlide, GroundTruth]) -> None:
    _, truth = puck
    section = slide_seq.read(truth.bundle, wsi="he.tif")
    assert section.units["unit_id"].tolist() == truth.unit_ids.tolist()
    np.testing.assert_array_equal(section.units["x_native"], truth.x_native)
    np.testing.assert_array_equal(section.units["y_native"], truth.y_native)
    np.testing.assert_array_equal(section.counts.toarray(), truth.counts.toarray())
    assert section.genes["feature"].tolist() == truth.genes["symbol"].tolist()


@pytest.mark.parametrize("placement", ["transform", "landmarks"])
def test_synthetic_puck_end_to_end(
    puck: tuple[SyntheticSlide, GroundTruth], tmp_path: Path, placement: str
) -> None:
    slide, truth = puck
    place = (
        {"transform": truth.transform_path}
        if placement == "transform"
        else {"landmarks": truth.extra["landmarks_path"]}
    )
    request = SectionRequest("slide-seq", truth.bundle, slide.path, "puck-1", **place)
    build_section(request, tmp_path / "corpus", CONFIG)
    units = stored_units(tmp_path / "corpus").set_index("unit_id")
    row = pd.read_parquet(tmp_path / "corpus" / "sections.parquet").iloc[0]
    assert len(units) + row["qc_n_units_dropped_tissue"] == len(truth.unit_ids)
    index = pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids)
    rows = index.loc[units.index].to_numpy()
    dense = truth.counts.toarray()
    stored_total = sum(int(np.sum(c)) for c in units["counts"])
    assert stored_total == int(dense[rows].sum())
    dropped = np.setdiff1d(np.arange(len(truth.unit_ids)), rows)
    assert stored_total == int(dense.sum()) - int(dense[dropped].sum())
    tolerance = 1e-9 if placement == "transform" else 1.5  # landmarks carry 1 px click noise
    np.testing.assert_allclose(units["x_wsi_px"], truth.x_wsi_px[rows], atol=tolerance)
    np.testing.assert_allclose(units["y_wsi_px"], truth.y_wsi_px[rows], atol=tolerance)
    assert row["mpp_source"] == "embedded" and row["unit_shape"] == "circle"
    if placement == "landmarks":
        assert row["qc_landmark_pairs"] == 8 and 0 < row["qc_landmark_rms_um"] < 1.0


def test_synthetic_curio_h5ad(tmp_path: Path, puck: tuple[SyntheticSlide, GroundTruth]) -> None:
    slide, _ = puck
    truth = write_slide_seq_bundle(tmp_path, slide, layout="curio", seed=5, n_genes=30)
    section = slide_seq.read(truth.bundle, wsi="he.tif")
    assert section.provenance.layout == "curio" and section.qc["um_per_coordinate"] == 1.0
    assert section.qc["positions_source"] == "spatial" and section.qc["counts_source"] == "X"
    assert section.units["unit_id"].tolist() == truth.unit_ids.tolist()
    np.testing.assert_array_equal(section.units["x_native"], truth.x_native)
    np.testing.assert_array_equal(section.counts.toarray(), truth.counts.toarray())


# -- malformed input --------------------------------------------------------------------------


def test_missing_bead_locations_names_the_folder(tmp_path: Path) -> None:
    folder = write_spacexr(tmp_path / "puck")
    (folder / "BeadLocationsForR.csv").unlink()
    with pytest.raises(BundleError, match="no bead locations for MappedDGEForR.csv") as err:
        slide_seq.read(folder, wsi="he.tif")
    assert str(folder) in str(err.value)


def test_missing_counts_lists_what_was_looked_for(tmp_path: Path) -> None:
    folder = write_spacexr(tmp_path / "puck")
    (folder / "MappedDGEForR.csv").unlink()
    with pytest.raises(BundleError, match=r"no bead counts found; looked for \*MappedDGEForR"):
        slide_seq.read(folder, wsi="he.tif")


def test_renamed_column_names_the_file(tmp_path: Path) -> None:
    folder = write_spacexr(tmp_path / "puck", header="barcodes,x,ycoord")
    with pytest.raises(BundleError, match=r"lacks columns \['xcoord'\]") as err:
        slide_seq.read(folder, wsi="he.tif")
    assert str(folder / "BeadLocationsForR.csv") in str(err.value)


def test_barcode_mismatch_under_the_threshold(tmp_path: Path) -> None:
    beads = [("AAAC", 1.0, 2.0), ("TTTT", 3.0, 4.0), ("GGGG", 5.0, 6.0)]
    folder = write_spacexr(tmp_path / "puck", beads=beads)
    with pytest.raises(BundleError, match=r"only 1 of 3 bead barcodes \(33.33%\)") as err:
        slide_seq.read(folder, wsi="he.tif")
    assert str(folder / "MappedDGEForR.csv") in str(err.value)
    assert slide_seq.read(folder, wsi="he.tif", min_match_rate=0.3).n_units == 1


def test_dge_written_beads_by_genes_is_read_the_same(tmp_path: Path) -> None:
    usual = slide_seq.read(write_spacexr(tmp_path / "a"), wsi="he.tif")
    flipped = slide_seq.read(write_spacexr(tmp_path / "b", transpose=True), wsi="he.tif")
    assert flipped.qc["dge_orientation"] == "beads_x_genes"
    pd.testing.assert_frame_equal(flipped.units, usual.units)
    np.testing.assert_array_equal(flipped.counts.toarray(), usual.counts.toarray())


def test_fractional_counts_are_refused(tmp_path: Path) -> None:
    folder = write_spacexr(tmp_path / "puck", dge=DGE / 2)
    message = r"unit row \d+ \(\S+\), feature column \d+ \(\S+\): count \S+ is not an integer"
    with pytest.raises(BundleError, match=message) as err:
        slide_seq.read(folder, wsi="he.tif")
    assert "MappedDGEForR.csv" in str(err.value)


def test_ambiguous_layout_is_refused(
    tmp_path: Path, puck: tuple[SyntheticSlide, GroundTruth]
) -> None:
    folder = write_spacexr(tmp_path / "puck")
    (folder / "puck_anndata.h5ad").write_bytes(b"")
    with pytest.raises(BundleError, match="pass counts= to choose"):
        slide_seq.read(folder, wsi="he.tif")
    with pytest.raises(BundleError, match="cannot read as an AnnData") as err:
        slide_seq.read(folder, wsi="he.tif", counts=folder / "puck_anndata.h5ad")
    assert "puck_anndata.h5ad" in str(err.value)
    assert slide_seq.read(folder, wsi="he.tif", counts=folder / "MappedDGEForR.csv").n_units == 3
