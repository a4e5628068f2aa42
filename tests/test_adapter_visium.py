"""Visium adapter: real public fixtures, synthetic Space Ranger 1.x / 2.x bundles, malformed input.

Also tests the platform registry (`platform_adapters.__init__`).
"""

from __future__ import annotations

import gzip
import inspect
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from adapter_contract import AdapterContract, BundleCase
from conftest import fixture_path

from histmol.errors import BundleError, ConfigError
from platform_adapters import (
    PLATFORMS,
    PlatformSpec,
    get_platform,
    load_reader,
    platform_names,
    visium,
)
from platform_adapters._tenx import read_10x_h5

# -- synthetic bundle writers (Space Ranger's native layouts) --------------------------------

POSITION_HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"
# barcode, in_tissue, array_row, array_col, pxl_row (y), pxl_col (x): rows differ from columns so
# a swapped axis cannot pass.
SPOTS = [
    ("AAAC-1", 1, 0, 0, 1000, 2000),
    ("AAAG-1", 1, 0, 2, 1010, 2138),
    ("AACC-1", 0, 1, 1, 1120, 2069),
    ("AACG-1", 1, 1, 3, 1130, 2207),
    ("AAGG-1", 1, 2, 0, 1240, 2001),
    ("ACCC-1", 0, 2, 2, 1250, 2139),
]
IN_TISSUE = [s[0] for s in SPOTS if s[1] == 1]
FEATURES = [  # id, name, feature_type
    ("ENSG00000000003", "TSPAN6", "Gene Expression"),
    ("ENSG00000000005", "TNMD", "Gene Expression"),
    ("NEG_1", "NegControlProbe_00001", "Gene Expression"),
    ("NEG_2", "NegControlProbe_00002", "Gene Expression"),
    ("ENSG00000000419", "DPM1", "Gene Expression"),
    ("CD3", "CD3_TotalSeqB", "Antibody Capture"),
]
# barcodes (IN_TISSUE order) x FEATURES
COUNTS = np.array(
    [
        [5, 0, 1, 0, 2, 9],
        [0, 3, 0, 2, 0, 4],
        [7, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 11, 1],
    ],
    dtype=np.int32,
)
SCALEFACTORS = {
    "spot_diameter_fullres": 89.4,
    "tissue_hires_scalef": 0.17,
    "fiducial_diameter_fullres": 144.5,
    "tissue_lowres_scalef": 0.051,
}


Feature = tuple[str, str, str]


def write_h5(path: Path, barcodes: list[str], features: list[Feature], counts: np.ndarray) -> None:
    """A Cell Ranger >= 3 feature-barcode HDF5 (CSC features x barcodes)."""
    csc = sp.csc_matrix(counts.T)  # features x barcodes, one column per barcode
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = csc.data.astype(np.int32)
        g["indices"] = csc.indices.astype(np.int64)
        g["indptr"] = csc.indptr.astype(np.int64)
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        fg = g.create_group("features")
        fg["id"] = np.array([f[0] for f in features], dtype="S")
        fg["name"] = np.array([f[1] for f in features], dtype="S")
        fg["feature_type"] = np.array([f[2] for f in features], dtype="S")
        fg["genome"] = np.array(["GRCh38"] * len(features), dtype="S")


def write_mex(
    folder: Path, barcodes: list[str], features: list[Feature], counts: np.ndarray, *, gz: bool
) -> None:
    """A 10x MEX folder: matrix.mtx, features.tsv, barcodes.tsv (gzipped when `gz`)."""
    folder.mkdir(parents=True)
    suffix = ".gz" if gz else ""

    def write(name: str, payload: bytes) -> None:
        target = folder / f"{name}{suffix}"
        target.write_bytes(gzip.compress(payload) if gz else payload)

    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, sp.coo_matrix(counts.T), field="integer")
    write("matrix.mtx", buffer.getvalue())
    write("features.tsv", "".join(f"{i}\t{n}\t{t}\n" for i, n, t in features).encode())
    write("barcodes.tsv", "".join(f"{b}\n" for b in barcodes).encode())


def write_spatial(outs: Path, *, header: bool, name: str | None = None) -> Path:
    spatial = outs / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    name = name or ("tissue_positions.csv" if header else "tissue_positions_list.csv")
    lines = ([POSITION_HEADER] if header else []) + [",".join(map(str, s)) for s in SPOTS]
    (spatial / name).write_text("\n".join(lines) + "\n")
    (spatial / "scalefactors_json.json").write_text(json.dumps(SCALEFACTORS))
    return spatial / name


def sr1_bundle(root: Path) -> Path:
    """Space Ranger 1.x: headerless tissue_positions_list.csv + filtered h5."""
    outs = root / "sample-A" / "outs"
    write_spatial(outs, header=False)
    write_h5(outs / "filtered_feature_bc_matrix.h5", IN_TISSUE, FEATURES, COUNTS)
    return outs


def sr2_bundle(root: Path) -> Path:
    """Space Ranger 2.x: headered tissue_positions.csv + filtered MEX folder, gzipped."""
    outs = root / "Sample_B"
    write_spatial(outs, header=True)
    write_mex(outs / "filtered_feature_bc_matrix", IN_TISSUE, FEATURES, COUNTS, gz=True)
    return outs


def check_synthetic(section: visium.Section) -> None:
    """Exact expectations shared by the SR1 and SR2 synthetic bundles."""
    assert section.units["unit_id"].tolist() == IN_TISSUE
    by_id = section.units.set_index("unit_id")
    assert by_id.loc["AACG-1", "x_native"] == 2207.0  # pxl_col_in_fullres: x is the column
    assert by_id.loc["AACG-1", "y_native"] == 1130.0
    assert by_id.loc["AACG-1", ["array_row", "array_col"]].tolist() == [1, 3]
    assert by_id["in_tissue"].tolist() == [1, 1, 1, 1]
    expected_ids = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"]
    assert section.genes["gene_id"].tolist() == expected_ids
    assert section.genes["symbol"].tolist() == ["TSPAN6", "TNMD", "DPM1"]
    np.testing.assert_array_equal(section.counts.toarray(), COUNTS[:, [0, 1, 4]])
    assert section.control_counts.columns.tolist() == ["negative_probe"]
    np.testing.assert_array_equal(section.control_counts["negative_probe"], [1, 2, 2, 0])
    assert section.qc["n_features_not_gene_expression"] == 1
    assert section.native_um_per_unit == pytest.approx(65.0 / 89.4)


# -- contract --------------------------------------------------------------------------------


class TestVisiumContract(AdapterContract):
    platform = "visium"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        return sr1_bundle(tmp_path), {}


# -- synthetic bundles -----------------------------------------------------------------------


def test_spaceranger1_list_csv_and_h5(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    section = visium.read(outs, wsi=tmp_path / "slide.svs")
    check_synthetic(section)
    assert section.section_id == "sample-a"  # the outs/ folder takes its parent's name
    assert section.qc["positions_format"] == "spaceranger1"
    assert section.qc["barcode_match_rate"] == 1.0
    assert section.native_to_wsi is None  # full-resolution pixels are the WSI's
    assert section.provenance.layout == "standard"
    # The folder holding outs/ is accepted too.
    assert visium.read(outs.parent, wsi="x.svs").n_units == 4


def test_spaceranger2_headered_csv_and_gzipped_mex(tmp_path: Path) -> None:
    outs = sr2_bundle(tmp_path)
    section = visium.read(outs, wsi=tmp_path / "slide.svs")
    check_synthetic(section)
    assert section.section_id == "sample_b"
    assert section.qc["positions_format"] == "spaceranger>=2.0"
    assert section.qc["matrix_source"] == "filtered_feature_bc_matrix"


def test_raw_matrix_is_restricted_to_tissue(tmp_path: Path) -> None:
    outs = tmp_path / "raw"
    write_spatial(outs, header=True)
    all_barcodes = [s[0] for s in SPOTS]
    raw = np.arange(len(SPOTS) * len(FEATURES), dtype=np.int32).reshape(len(SPOTS), -1)
    write_mex(outs / "raw_feature_bc_matrix", all_barcodes, FEATURES, raw, gz=False)
    section = visium.read(outs, wsi="x.svs")
    assert section.units["unit_id"].tolist() == IN_TISSUE
    assert section.qc["matrix_is_raw"] is True
    keep = [i for i, s in enumerate(SPOTS) if s[1] == 1]
    np.testing.assert_array_equal(section.counts.toarray(), raw[keep][:, [0, 1, 4]])


def test_cytassist_layout_is_recorded(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    (outs / "spatial" / "cytassist_image.tiff").write_bytes(b"II*\x00")
    assert visium.read(outs, wsi="x.svs").provenance.layout == "cytassist"


def test_bundle_lowres_and_hires_images_set_the_transform(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    low = visium.read(outs, wsi=outs / "spatial" / "tissue_lowres_image.png")
    np.testing.assert_allclose(low.native_to_wsi, np.diag([0.051, 0.051, 1.0]))
    high = visium.read(outs, wsi=outs / "spatial" / "tissue_hires_image.png")
    np.testing.assert_allclose(high.native_to_wsi, np.diag([0.17, 0.17, 1.0]))
    explicit = np.diag([0.5, 0.5, 1.0])
    lowres = outs / "spatial" / "tissue_lowres_image.png"
    won = visium.read(outs, wsi=lowres, native_to_wsi=explicit)
    np.testing.assert_array_equal(won.native_to_wsi, explicit)


def test_positions_list_with_a_header_is_accepted(tmp_path: Path) -> None:
    # Some tools rewrite the 1.x list with a header (scverse/spatialdata-io issue #146).
    outs = tmp_path / "hdr"
    write_spatial(outs, header=True, name="tissue_positions_list.csv")
    write_h5(outs / "filtered_feature_bc_matrix.h5", IN_TISSUE, FEATURES, COUNTS)
    check_synthetic(visium.read(outs, wsi="x.svs"))


def test_cellranger2_genes_tsv_and_legacy_h5(tmp_path: Path) -> None:
    genes = [(i, n, "Gene Expression") for i, n, t in FEATURES if t == "Gene Expression"]
    counts = COUNTS[:, [0, 1, 2, 3, 4]]
    outs = tmp_path / "cr2"
    write_spatial(outs, header=False)
    folder = outs / "filtered_feature_bc_matrix"
    write_mex(folder, IN_TISSUE, genes, counts, gz=False)
    (folder / "features.tsv").unlink()
    (folder / "genes.tsv").write_text("".join(f"{i}\t{n}\n" for i, n, _ in genes))
    section = visium.read(outs, wsi="x.svs")
    np.testing.assert_array_equal(section.counts.toarray(), COUNTS[:, [0, 1, 4]])
    # Cell Ranger 2 HDF5: one group per genome with genes / gene_names, no feature types.
    h5 = outs / "filtered_feature_bc_matrix.h5"
    csc = sp.csc_matrix(counts.T)
    with h5py.File(h5, "w") as f:
        g = f.create_group("GRCh38")
        for key, value in (("data", csc.data), ("indices", csc.indices), ("indptr", csc.indptr)):
            g[key] = value
        g["shape"] = np.array(csc.shape)
        g["barcodes"] = np.array(IN_TISSUE, dtype="S")
        g["genes"] = np.array([i for i, _, _ in genes], dtype="S")
        g["gene_names"] = np.array([n for _, n, _ in genes], dtype="S")
    section = visium.read(outs, wsi="x.svs")  # the h5 is preferred over the MEX folder
    assert section.qc["matrix_source"] == "filtered_feature_bc_matrix.h5"
    np.testing.assert_array_equal(section.counts.toarray(), COUNTS[:, [0, 1, 4]])
    np.testing.assert_array_equal(section.control_counts["negative_probe"], [1, 2, 2, 0])


# -- malformed input -------------------------------------------------------------------------


def test_missing_matrix_lists_alternatives(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(BundleError) as err:
        visium.read(outs, wsi="x.svs")
    message = str(err.value)
    assert str(outs) in message
    names = (
        "filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix", "raw_feature_bc_matrix.h5"
    )
    for name in names:
        assert name in message


def test_missing_positions_lists_both_versions(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    with pytest.raises(BundleError, match="tissue_positions.csv.*tissue_positions_list.csv"):
        visium.read(outs, wsi="x.svs")


def test_missing_scalefactors_is_named(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(BundleError, match="scalefactors_json.json"):
        visium.read(outs, wsi="x.svs")


def test_scalefactors_without_spot_diameter(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    scalefactors = outs / "spatial" / "scalefactors_json.json"
    scalefactors.write_text(json.dumps({"tissue_hires_scalef": 0.1}))
    with pytest.raises(BundleError, match="spot_diameter_fullres"):
        visium.read(outs, wsi="x.svs")


def test_renamed_position_column_lists_found_and_expected(tmp_path: Path) -> None:
    outs = sr2_bundle(tmp_path)
    positions = outs / "spatial" / "tissue_positions.csv"
    positions.write_text(positions.read_text().replace("pxl_row_in_fullres", "pxl_row"))
    with pytest.raises(BundleError) as err:
        visium.read(outs, wsi="x.svs")
    message = str(err.value)
    assert str(positions) in message
    assert "pxl_row_in_fullres" in message and "'pxl_row'" in message


def test_headerless_positions_with_wrong_column_count(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    positions = outs / "spatial" / "tissue_positions_list.csv"
    positions.write_text("\n".join(",".join(map(str, s[:5])) for s in SPOTS) + "\n")
    with pytest.raises(BundleError, match="5 columns"):
        visium.read(outs, wsi="x.svs")


def test_truncated_h5_is_named(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match=str(h5)):
        visium.read(outs, wsi="x.svs")


def test_match_rate_under_threshold_names_both_files(tmp_path: Path) -> None:
    outs = sr1_bundle(tmp_path)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    write_h5(h5, ["AAAC-1", "AAAG-1", "TTTT-1", "GGGG-1"], FEATURES, COUNTS)
    with pytest.raises(BundleError) as err:
        visium.read(outs, wsi="x.svs")
    message = str(err.value)
    assert str(h5) in message and "tissue_positions_list.csv" in message and "50.00%" in message
    assert visium.read(outs, wsi="x.svs", min_match_rate=0.5).n_units == 2


# -- real public fixtures --------------------------------------------------------------------


def test_visium_seurat_fixture() -> None:
    outs = fixture_path("visium_seurat")
    section = visium.read(outs, wsi=outs / "spatial" / "tissue_lowres_image.png")
    assert (section.n_units, section.n_genes) == (2695, 100)
    assert section.qc["n_position_rows"] == 4992 and section.qc["n_positions_in_tissue"] == 2695
    assert section.qc["barcode_match_rate"] == 1.0
    assert section.section_id == "visium_seurat"
    np.testing.assert_allclose(section.native_to_wsi, np.diag([0.051635113, 0.051635113, 1.0]))
    assert section.native_um_per_unit == pytest.approx(65.0 / 89.47248494250101)
    # 65 um (not 55) per spot_diameter_fullres gives the Visium 100 um pitch back.
    assert section.qc["pitch_um_from_positions"] == pytest.approx(100.0, rel=0.01)
    # Coordinates, read independently: x is pxl_col_in_fullres (column 5), y pxl_row (column 4).
    positions_file = outs / "spatial" / "tissue_positions_list.csv"
    positions = pd.read_csv(positions_file, header=None, index_col=0)
    units = section.units.set_index("unit_id")
    np.testing.assert_array_equal(units["x_native"], positions.loc[units.index, 5].to_numpy(float))
    np.testing.assert_array_equal(units["y_native"], positions.loc[units.index, 4].to_numpy(float))
    assert units.loc["AAACAAGTATCTCCCA-1", ["x_native", "y_native"]].tolist() == [8501.0, 7475.0]
    # Counts, read independently with scanpy.
    import scanpy

    reference = scanpy.read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    assert reference.obs_names.tolist() == section.units["unit_id"].tolist()
    assert reference.var["gene_ids"].tolist() == section.genes["gene_id"].tolist()
    assert (sp.csr_matrix(reference.X) != section.counts).nnz == 0


def test_visium_spatialexperiment_raw_mex_fixture() -> None:
    outs = fixture_path("visium_spatialexperiment/section1/outs")
    section = visium.read(outs, wsi="x.svs")
    assert section.section_id == "section1"
    assert section.qc["n_matrix_barcodes"] == 50 and section.qc["barcode_match_rate"] == 1.0
    assert section.qc["matrix_is_raw"] is True
    assert (section.n_units, section.n_genes) == (22, 50)  # 22 of the 50 spots are in tissue
    matrix = scipy.io.mmread(outs / "raw_feature_bc_matrix" / "matrix.mtx").tocsc()
    barcodes = pd.read_csv(outs / "raw_feature_bc_matrix" / "barcodes.tsv", header=None)[0].tolist()
    column = barcodes.index("AAACAAGTATCTCCCA-1")
    row = section.units["unit_id"].tolist().index("AAACAAGTATCTCCCA-1")
    np.testing.assert_array_equal(
        section.counts[row].toarray().ravel(), matrix[:, column].toarray().ravel()
    )
    units = section.units.set_index("unit_id")
    assert units.loc["AAACAAGTATCTCCCA-1", ["x_native", "y_native"]].tolist() == [8230.0, 7237.0]
    assert units.loc["AAACAAGTATCTCCCA-1", ["array_row", "array_col"]].tolist() == [50, 102]


def test_visium_spatialexperiment_section2_match_rate() -> None:
    outs = fixture_path("visium_spatialexperiment/section2/outs")
    section = visium.read(outs, wsi="x.svs", min_match_rate=0.9)
    assert section.qc["barcode_match_rate"] == pytest.approx(49 / 50)
    assert section.n_units == 22
    with pytest.raises(BundleError, match=r"49 of 50 barcodes \(98.00%\)"):
        visium.read(outs, wsi="x.svs", min_match_rate=0.99)


def test_read_10x_h5_independent_of_the_adapter() -> None:
    matrix = read_10x_h5(fixture_path("visium_seurat") / "filtered_feature_bc_matrix.h5")
    assert matrix.counts.shape == (2695, 100) and matrix.counts.dtype == np.int32
    assert set(matrix.feature_types) == {"Gene Expression"}


# -- registry --------------------------------------------------------------------------------


def test_registry_holds_all_twelve_platforms() -> None:
    assert platform_names() == (
        "visium", "visium-hd", "xenium", "st", "stereo-seq", "slide-seq", "cosmx", "merscope",
        "dbit-seq", "seq-scope", "hdst", "open-st",
    )
    for spec in PLATFORMS.values():
        assert spec.expected_files and spec.description
        assert spec.default_mode in ("spot", "grid") and spec.unit_shape in ("circle", "square")
        assert spec.unit_size_um > 0 and spec.pitch_um >= spec.unit_size_um
        assert PlatformSpec.from_dict(spec.to_dict()) == spec
    spot_platforms = {s.name for s in PLATFORMS.values() if s.default_mode == "spot"}
    assert spot_platforms == {"visium", "st", "dbit-seq"}


def test_get_platform_and_load_reader() -> None:
    assert get_platform("Visium").pitch_um == 100.0
    assert load_reader("visium") is visium.read
    with pytest.raises(ConfigError, match="valid platforms: visium, visium-hd"):
        get_platform("visium2")
    for spec in PLATFORMS.values():
        parameters = inspect.signature(load_reader(spec.name)).parameters
        keywords = {"wsi", "section_id", "metadata", "min_match_rate", "native_to_wsi"}
        assert keywords <= set(parameters)
