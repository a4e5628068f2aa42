"""Legacy ST adapter: real MOB1 fixture, synthetic bundles, array-grid fallback, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from adapter_contract import AdapterContract, BundleCase
from conftest import fixture_path

from histmol.errors import BundleError, ConfigError
from platform_adapters import st

# -- synthetic bundle writers (ST Pipeline matrix, ST Spot Detector selection) ----------------

SPOT_IDS = ["1x1", "1x3", "2x2", "3x1", "3x3"]
GENES = ["ENSMUSG00000000001.4", "Gapdh", "NegControlProbe_00001", "ENSMUSG00000000001.5", "Actb"]
# spots x genes
COUNTS = np.array(
    [
        [3, 0, 1, 1, 0],
        [0, 5, 0, 0, 2],
        [4, 1, 2, 0, 0],
        [0, 0, 0, 6, 9],
        [1, 1, 1, 1, 1],
    ],
    dtype=np.int64,
)
# x, y, new_x, new_y, pixel_x, pixel_y, selected; plus a spot with no counts (5x5).
SELECTION = [
    (1, 1, 1.02, 0.98, 100.5, 210.25, 1),
    (1, 3, 0.99, 3.01, 101.0, 305.0, 0),
    (2, 2, 2.0, 2.0, 150.0, 260.0, 1),
    (3, 1, 3.01, 1.0, 199.5, 209.0, 1),
    (3, 3, 3.0, 2.97, 200.0, 306.5, 1),
    (5, 5, 5.0, 5.0, 300.0, 400.0, 1),
]
HEADER = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]


def write_counts(
    path: Path,
    spot_ids: list[str],
    counts: np.ndarray = COUNTS,
    genes: list[str] = GENES,
    *,
    spots_as_rows: bool = True,
) -> Path:
    """Write an ST Pipeline matrix (gzipped for .gz names).

    Spots as rows with an empty corner cell, or genes as rows (R style, no corner cell).
    """
    if spots_as_rows:
        lines = ["\t" + "\t".join(genes)]
        for spot, row in zip(spot_ids, counts, strict=True):
            lines.append(spot + "\t" + "\t".join(map(str, row)))
    else:
        lines = ["\t".join(spot_ids)]
        for gene, column in zip(genes, counts.T, strict=True):
            lines.append(gene + "\t" + "\t".join(map(str, column)))
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def write_selection(
    path: Path,
    rows: list[tuple[float, ...]] | None = None,
    *,
    header: bool = True,
    selected: bool = True,
) -> Path:
    """Spot detector export: x y new_x new_y pixel_x pixel_y [selected], header optional."""
    rows = SELECTION if rows is None else rows
    width = 7 if selected else 6
    lines = ["\t".join(HEADER[:width])] if header else []
    lines += ["\t".join(map(str, row[:width])) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def st_bundle(root: Path) -> Path:
    folder = root / "Breast_Cancer-L1"
    write_counts(folder / "Layer1_BC_stdata.tsv", SPOT_IDS)
    write_selection(folder / "spot_data-selection-Layer1_BC.tsv")
    return folder


# -- contract --------------------------------------------------------------------------------


class TestSTContract(AdapterContract):
    platform = "st"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        return st_bundle(tmp_path), {}


# -- synthetic bundles -----------------------------------------------------------------------


def test_selection_bundle_spots_as_rows(tmp_path: Path) -> None:
    folder = st_bundle(tmp_path)
    section = st.read(folder, wsi=folder / "he.jpg")
    assert section.section_id == "breast_cancer-l1"
    assert section.provenance.layout == "spot_detector_selection"
    # 1x3 is not selected (outside tissue) and is dropped, like STUtility's InputFromTable.
    assert section.units["unit_id"].tolist() == ["1x1", "2x2", "3x1", "3x3"]
    units = section.units.set_index("unit_id")
    assert units.loc["3x1", ["x_native", "y_native"]].tolist() == [199.5, 209.0]  # pixel_x, pixel_y
    assert units.loc["3x1", ["array_x", "array_y"]].tolist() == [3, 1]
    assert units.loc["1x1", ["new_x", "new_y"]].tolist() == [1.02, 0.98]
    # Versioned duplicates of one Ensembl id are summed; the control probe is split out.
    assert section.genes["gene_id"].tolist() == [  # Gapdh and Actb resolved by symbol
        "ENSMUSG00000000001", "ENSMUSG00000057666", "ENSMUSG00000029580"]
    keep = [0, 2, 3, 4]
    expected = np.stack([COUNTS[:, 0] + COUNTS[:, 3], COUNTS[:, 1], COUNTS[:, 4]], axis=1)[keep]
    np.testing.assert_array_equal(section.counts.toarray(), expected)
    np.testing.assert_array_equal(section.control_counts["negative_probe"], COUNTS[keep, 2])
    assert section.native_to_wsi is None and section.native_um_per_unit is None
    assert section.qc["spot_match_rate"] == 1.0 and section.qc["n_matched_selected"] == 4


def test_keep_spots_outside_tissue(tmp_path: Path) -> None:
    section = st.read(st_bundle(tmp_path), wsi="he.jpg", tissue_only=False)
    assert section.units["unit_id"].tolist() == SPOT_IDS
    assert section.units["in_tissue"].tolist() == [1, 0, 1, 1, 1]


def test_spots_as_columns_gzipped_and_headerless_selection(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    write_counts(folder / "counts.tsv.gz", SPOT_IDS, spots_as_rows=False)
    write_selection(folder / "b_selection.tsv", header=False, selected=False)
    section = st.read(folder, wsi="he.jpg")
    assert section.units["unit_id"].tolist() == SPOT_IDS  # no selected column: every spot kept
    assert "in_tissue" not in section.units
    assert section.units["x_native"].tolist() == [100.5, 101.0, 150.0, 199.5, 200.0]
    assert section.counts.toarray()[:, 1].tolist() == COUNTS[:, 1].tolist()


def test_adjusted_float_ids_join_on_new_xy(tmp_path: Path) -> None:
    folder = tmp_path / "adj"
    ids = ["1.02x0.98", "0.99x3.01", "2.0x2.0", "3.01x1.0", "3.0x2.97"]
    write_counts(folder / "adjusted.tsv", ids)
    write_selection(folder / "sel_selection.tsv")
    section = st.read(folder, wsi="he.jpg", tissue_only=False)
    assert section.qc["join_key"] == "adjusted_new_xy"
    assert section.units["unit_id"].tolist() == ids
    assert section.units["array_x"].tolist() == [1, 1, 2, 3, 3]


def test_explicit_file_overrides(tmp_path: Path) -> None:
    folder = st_bundle(tmp_path)
    write_counts(folder / "other.tsv", SPOT_IDS[:2], COUNTS[:2])
    with pytest.raises(BundleError, match="ambiguous count matrix"):
        st.read(folder, wsi="he.jpg")
    section = st.read(folder, wsi="he.jpg", counts=folder / "other.tsv", tissue_only=False)
    assert section.n_units == 2


# -- no positions file: the array grid -------------------------------------------------------


def test_array_grid_needs_a_transform(tmp_path: Path) -> None:
    folder = tmp_path / "grid"
    write_counts(folder / "grid.tsv", SPOT_IDS)
    with pytest.raises(BundleError, match="explicit transform is needed") as err:
        st.read(folder, wsi="he.jpg")
    assert str(folder) in str(err.value) and "selection" in str(err.value)
    matrix = np.array([[48.0, 0.0, 10.0], [0.0, 48.0, 20.0], [0.0, 0.0, 1.0]])
    section = st.read(folder, wsi="he.jpg", native_to_wsi=matrix)
    assert section.units["x_native"].tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]  # array x
    assert section.units["y_native"].tolist() == [1.0, 3.0, 2.0, 1.0, 3.0]  # array y
    np.testing.assert_array_equal(section.native_to_wsi, matrix)
    assert section.provenance.layout == "naive_grid_explicit_transform"


def test_array_grid_with_cropped_1k_image_convention(tmp_path: Path) -> None:
    folder = tmp_path / "grid"
    write_counts(folder / "grid.tsv", SPOT_IDS)
    section = st.read(folder, wsi="he.jpg", cropped_image_size=(3200, 3400))
    # st_analysis convert_spot_coordinates.py: pixel = ((x - 1) * w / 32, (y - 1) * h / 34).
    np.testing.assert_allclose(section.native_to_wsi, [[100, 0, -100], [0, 100, -100], [0, 0, 1]])
    assert section.provenance.layout == "naive_grid_cropped_1k"
    write_counts(folder / "grid.tsv", ["40x1"], COUNTS[:1])
    with pytest.raises(BundleError, match="outside the 1k array"):
        st.read(folder, wsi="he.jpg", cropped_image_size=(3200, 3400))
    with pytest.raises(ConfigError):
        st.read(folder, wsi="he.jpg", cropped_image_size=(0, 10))


def test_array_grid_with_spot_detector_transform_file(tmp_path: Path) -> None:
    folder = tmp_path / "grid"
    write_counts(folder / "grid.tsv", SPOT_IDS)
    # The spot detector writes its affine column-major: m00 m10 m20 m01 m11 m21 m02 m12 m22.
    transform = tmp_path / "transformation.txt"
    transform.write_text("60.5 0.5 0 -0.5 61 0 -40 -35 1")
    section = st.read(folder, wsi="he.jpg", transform=transform)
    expected = [[60.5, -0.5, -40], [0.5, 61, -35], [0, 0, 1]]
    np.testing.assert_array_equal(section.native_to_wsi, expected)
    assert str(transform) in section.provenance.files


# -- malformed input -------------------------------------------------------------------------


def test_spot_ids_that_are_not_xxy(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    counts = write_counts(folder / "bad.tsv", ["A1", "A2", "B1", "B2", "C1"])
    write_selection(folder / "bad_selection.tsv")
    with pytest.raises(BundleError, match="XxY") as err:
        st.read(folder, wsi="he.jpg")
    assert str(counts) in str(err.value)


def test_mixed_spot_ids_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    counts = write_counts(folder / "mixed.tsv", ["1x1", "1x3", "2x2", "3x1", "spot5"])
    write_selection(folder / "m_selection.tsv")
    with pytest.raises(BundleError, match="spot5") as err:
        st.read(folder, wsi="he.jpg")
    assert str(counts) in str(err.value)


def test_ambiguous_positions_files_are_listed(tmp_path: Path) -> None:
    folder = st_bundle(tmp_path)
    write_selection(folder / "alignment_table_L1.tsv")
    with pytest.raises(BundleError, match="alignment_table_L1.tsv.*spot_data-selection") as err:
        st.read(folder, wsi="he.jpg")
    assert "positions=" in str(err.value)
    assert st.read(folder, wsi="he.jpg", positions=folder / "alignment_table_L1.tsv").n_units == 4


def test_renamed_selection_column_lists_found_and_expected(tmp_path: Path) -> None:
    folder = st_bundle(tmp_path)
    selection = folder / "spot_data-selection-Layer1_BC.tsv"
    selection.write_text(selection.read_text().replace("pixel_x", "px"))
    with pytest.raises(BundleError) as err:
        st.read(folder, wsi="he.jpg")
    message = str(err.value)
    assert str(selection) in message and "'px'" in message and "pixel_x" in message


def test_missing_counts_lists_what_was_looked_for(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    write_selection(folder / "x_selection.tsv")
    with pytest.raises(BundleError, match=r"no count matrix found; looked for \*\.tsv"):
        st.read(folder, wsi="he.jpg")


def test_match_rate_under_threshold(tmp_path: Path) -> None:
    folder = st_bundle(tmp_path)
    write_selection(folder / "spot_data-selection-Layer1_BC.tsv", SELECTION[:3])
    with pytest.raises(BundleError, match=r"3 of 5 spots \(60.00%\)") as err:
        st.read(folder, wsi="he.jpg")
    assert "Layer1_BC_stdata.tsv" in str(err.value) and "spot_data-selection" in str(err.value)


def test_fractional_counts_are_refused(tmp_path: Path) -> None:
    folder = st_bundle(tmp_path)
    write_counts(folder / "Layer1_BC_stdata.tsv", SPOT_IDS, COUNTS / 2)
    message = (r"Layer1_BC_stdata.tsv: unit row 0 \(\d+x\d+\), feature column 0 \(\S+\): "
               r"count \S+ is not an integer")
    with pytest.raises(BundleError, match=message):
        st.read(folder, wsi="he.jpg")


# -- real public fixture: STUtility MOB1 (2k array) --------------------------------------------

MOB1 = "legacy_st_stutility_MOB1/counts"


def test_mob1_every_aligned_spot() -> None:
    folder = fixture_path(MOB1)
    section = st.read(folder, wsi=folder / "MOB1.jpg", section_id="mob1", tissue_only=False)
    assert section.provenance.layout == "stutility_alignment_table"
    assert section.qc["n_count_spots"] == 1934 and section.qc["n_position_rows"] == 2068
    assert (section.n_units, section.n_genes) == (1923, 1000)  # 11 count spots lack a row
    assert section.qc["spot_match_rate"] == pytest.approx(1923 / 1934)
    counts = pd.read_csv(folder / "MOB1.tsv", sep="\t", index_col=0)
    table = pd.read_csv(folder / "alignment_table_MOB1.tsv", sep="\t")
    aligned = {f"{x}x{y}" for x, y in zip(table["x"], table["y"], strict=True)}
    missing = sorted(set(counts.index) - aligned)
    assert len(missing) == 11 and "34x6" in missing
    assert not set(missing) & set(section.units["unit_id"])
    unversioned = counts.columns.str.replace(r"\.\d+$", "", regex=True)
    assert section.genes["feature"].tolist() == counts.columns.tolist()
    resolved = section.genes["resolved"].to_numpy()
    assert resolved.sum() == 997  # 3 ids retired from Ensembl stay under unresolved keys
    assert section.genes["gene_id"][resolved].tolist() == unversioned[resolved].tolist()
    units = section.units.set_index("unit_id")
    for spot in ("10x10", "12x28", "65x33", "64x62"):
        x, y = (int(v) for v in spot.split("x"))
        row = table[(table["x"] == x) & (table["y"] == y)].iloc[0]
        xy = units.loc[spot, ["x_native", "y_native"]].tolist()
        assert xy == [row["pixel_x"], row["pixel_y"]]
        position = section.units["unit_id"].tolist().index(spot)
        np.testing.assert_array_equal(
            section.counts[position].toarray().ravel(), counts.loc[spot].to_numpy()
        )
    assert units.loc["10x10", ["x_native", "y_native"]].tolist() == [465.2, 287.6]
    assert int(section.counts.sum()) == int(counts.drop(index=missing).to_numpy().sum())


def test_mob1_tissue_only_like_stutility() -> None:
    folder = fixture_path(MOB1)
    section = st.read(folder, wsi=folder / "MOB1.jpg")
    # STUtility's InputFromTable keeps selected == 1 spots: 379 of the 1923 aligned ones.
    assert (section.n_units, section.n_genes) == (379, 1000)
    assert section.qc["n_matched_spots"] == 1923 and section.qc["n_matched_selected"] == 379
    assert section.units["in_tissue"].eq(1).all()
    units = section.units.set_index("unit_id")
    assert units.loc["12x28", ["x_native", "y_native"]].tolist() == [506.25, 720.95]
    assert units.loc["12x28", ["new_x", "new_y"]].tolist() == [12.0, 27.99]
    # Every spot lies inside the 1905 x 1905 px MOB1.jpg.
    assert units["x_native"].between(0, 1905).all() and units["y_native"].between(0, 1905).all()
    # A staggered 2k array: its pitch is not documented, so none is claimed (mpp must be given).
    assert section.qc["array_layout"] == "2k-staggered" and section.pitch_um is None


def test_1k_array_claims_the_200_um_pitch(tmp_path: Path) -> None:
    section = st.read(st_bundle(tmp_path), wsi=tmp_path / "he.jpg")
    assert section.qc["array_layout"] == "1k" and section.pitch_um == 200.0
