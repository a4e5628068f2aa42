"""Seq-Scope adapter: hand-written NovaScope SGE folders, a synthetic section, bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from adapter_contract import AdapterContract, BundleCase
from gene_space_helpers import truth_columns

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError, QCError, RegistrationError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_seq_scope_bundle
from platform_adapters import seq_scope

# (barcode, index, x nm, y nm): 5 listed; index 5 is used by no entry.
BARCODES = [
    ("AAAACCCCGGGGTTTTAAAACCCCGGGGTT", 1, 1000, 1000),  # bin (col 0, row 0)
    ("AAAACCCCGGGGTTTTAAAACCCCGGGGTA", 2, 7999, 500),  # bin (0, 0): 7.999 um
    ("AAAACCCCGGGGTTTTAAAACCCCGGGGTC", 3, 8000, 500),  # bin (1, 0): the border goes right
    ("AAAACCCCGGGGTTTTAAAACCCCGGGGTG", 4, 20500, 16100),  # bin (2, 2)
    ("AAAACCCCGGGGTTTTAAAACCCCGGGGAA", 5, 90000, 90000),
]
# (id, symbol, matrix index), listed out of index order on purpose.
FEATURES = [
    ("ENSMUSG00000000028", "Cdc45", 2),
    ("ENSMUSG00000000001", "Gnai3", 1),
    ("ENSMUSG00000000037", "Scml2", 3),
]
# feature, barcode, Gene, GeneFull, Spliced, Unspliced, Ambiguous
ENTRIES = [
    (1, 1, 2, 3, 2, 1, 0),
    (2, 1, 1, 1, 1, 0, 0),
    (1, 2, 0, 4, 0, 4, 0),  # intronic only: no Gene count
    (3, 3, 5, 5, 5, 0, 0),
    (2, 4, 7, 9, 7, 2, 0),
]
GENE_IDS = ["ENSMUSG00000000001", "ENSMUSG00000000028", "ENSMUSG00000000037"]
# bins in (row, col) order: c0_r0, c1_r0, c2_r2; columns follow GENE_IDS (matrix index order)
EXPECTED_GENE = [[2, 1, 0], [0, 0, 5], [0, 7, 0]]
EXPECTED_GENE_FULL = [[7, 1, 0], [0, 0, 5], [0, 9, 0]]
CONFIG = BuildConfig(patch_px=64)


def _gz(path: Path, lines: list[str]) -> None:
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def write_sge(
    folder: Path,
    *,
    barcodes: list[tuple[str, int, int, int]] = BARCODES,
    features: list[tuple[str, str, int]] = FEATURES,
    entries: list[tuple[int, ...]] = ENTRIES,
    dims: tuple[int, int, int] | None = None,
) -> Path:
    """A NovaScope SGE folder in the dge2sdge layout."""
    folder.mkdir(parents=True, exist_ok=True)
    _gz(
        folder / "barcodes.tsv.gz",
        [f"{b}\t{i}\t{i + 10}\t1\t1\t{x}\t{y}\t0,0,0,0,0" for b, i, x, y in barcodes],
    )
    _gz(folder / "features.tsv.gz", [f"{g}\t{s}\t{i}\t0,0,0,0,0" for g, s, i in features])
    n_features, n_barcodes, n_entries = dims or (len(features), len(barcodes), len(entries))
    _gz(
        folder / "matrix.mtx.gz",
        [
            "%%MatrixMarket matrix coordinate integer general",
            "%",
            f"{n_features} {n_barcodes} {n_entries}",
        ]
        + [" ".join(map(str, e)) for e in entries],
    )
    return folder


class TestSeqScopeContract(AdapterContract):
    platform = "seq-scope"

    @pytest.fixture
    def bundle(self, tmp_path: Path) -> BundleCase:
        folder = tmp_path / "liver_run1"
        write_sge(folder / "sge")
        return folder, {}


# -- hand-written SGE folders ------------------------------------------------------------------


def test_entries_are_binned_exactly(tmp_path: Path) -> None:
    folder = write_sge(tmp_path / "sge")
    section = seq_scope.read(folder, wsi="he.tif")
    assert section.units["unit_id"].tolist() == ["c0_r0", "c1_r0", "c2_r2"]
    assert section.units["x_native"].tolist() == [4000.0, 12000.0, 20000.0]  # bin centres, nm
    assert section.units["y_native"].tolist() == [4000.0, 4000.0, 20000.0]
    assert section.genes["gene_id"].tolist() == GENE_IDS
    assert section.genes["symbol"].tolist() == ["Gnai3", "Cdc45", "Scml2"]
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED_GENE)
    assert (section.unit_shape, section.unit_size_um) == ("square", 8.0)
    assert section.default_mode == "grid"
    assert section.native_um_per_unit == 0.001 and section.native_to_wsi is None
    assert section.qc["n_entries_zero_in_column"] == 1 and section.qc["barcode_match_rate"] == 1.0


def test_gene_full_column_and_other_bin_sizes(tmp_path: Path) -> None:
    folder = write_sge(tmp_path / "sge")
    full = seq_scope.read(folder, wsi="he.tif", count_column="GeneFull")
    np.testing.assert_array_equal(full.counts.toarray(), EXPECTED_GENE_FULL)
    fine = seq_scope.read(folder, wsi="he.tif", bin_um=2.0, units_per_um=1000.0)
    assert fine.unit_size_um == fine.pitch_um == 2.0
    # barcode 2 (7.999 um, bin c3_r0) holds no Gene count: no bin for it
    assert fine.units["unit_id"].tolist() == ["c0_r0", "c4_r0", "c10_r8"]
    assert int(fine.counts.sum()) == 15
    with pytest.raises(ConfigError, match="count_column"):
        seq_scope.read(folder, wsi="he.tif", count_column="Exon")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bin_um"):
        seq_scope.read(folder, wsi="he.tif", bin_um=0)


def test_explicit_transform_and_plain_mex(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    single = [(f, b, g) for f, b, g, *_ in ENTRIES]
    write_sge(folder / "sge", entries=single)  # a 10x-style MEX: one count column
    matrix = np.array([[0.0, 0.5, 10.0], [0.5, 0.0, 20.0], [0.0, 0.0, 1.0]])
    section = seq_scope.read(folder, wsi="he.tif", native_to_wsi=matrix)
    np.testing.assert_array_equal(section.native_to_wsi, matrix)
    assert section.qc["count_column"] == "single" and section.qc["has_transform"] is True
    np.testing.assert_array_equal(section.counts.toarray(), EXPECTED_GENE)


# -- malformed input ---------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a NovaScope SGE folder"):
        seq_scope.read(tmp_path, wsi="he.tif")
    folder = write_sge(tmp_path / "sge")
    (folder / "features.tsv.gz").unlink()
    with pytest.raises(BundleError, match=r"sge: SGE folder lacks \['features.tsv.gz'\]"):
        seq_scope.read(tmp_path, wsi="he.tif")


def test_barcodes_without_coordinate_columns(tmp_path: Path) -> None:
    folder = write_sge(tmp_path / "sge")
    _gz(folder / "barcodes.tsv.gz", [f"{b}\t{i}\t{x}\t{y}" for b, i, x, y in BARCODES])
    with pytest.raises(BundleError, match=r"barcodes.tsv.gz: has 4 tab-separated columns"):
        seq_scope.read(folder, wsi="he.tif")
    _gz(folder / "barcodes.tsv.gz", [f"{b}\t{i}\t1\t1\t1\tX{x}\t{y}\t0" for b, i, x, y in BARCODES])
    with pytest.raises(BundleError, match=r"barcodes.tsv.gz: columns 2, 6 and 7"):
        seq_scope.read(folder, wsi="he.tif")


def test_barcode_ids_missing_from_the_barcode_list(tmp_path: Path) -> None:
    # barcodes 1 and 2 are declared by the matrix but not listed
    folder = write_sge(tmp_path / "sge", barcodes=BARCODES[2:], dims=(3, 5, 5))
    with pytest.raises(BundleError, match=r"matrix.mtx.gz: only 2 of the 4 barcodes .*barcodes"):
        seq_scope.read(folder, wsi="he.tif")
    section = seq_scope.read(folder, wsi="he.tif", min_match_rate=0.5)
    assert section.qc["barcode_match_rate"] == 0.5
    assert section.qc["n_entries_without_coordinates"] == 3
    np.testing.assert_array_equal(section.counts.toarray(), [[0, 0, 5], [0, 7, 0]])


def test_indices_outside_the_dimensions(tmp_path: Path) -> None:
    folder = write_sge(tmp_path / "sge", entries=ENTRIES + [(1, 6, 1, 1, 1, 0, 0)], dims=(3, 6, 6))
    # the barcode list has 5 rows for 6 declared barcodes: index 6 has no coordinates
    with pytest.raises(BundleError, match=r"matrix.mtx.gz: only 4 of the 5 barcodes"):
        seq_scope.read(folder, wsi="he.tif")
    write_sge(folder, entries=ENTRIES + [(4, 1, 1, 1, 1, 0, 0)], dims=(3, 5, 6))
    with pytest.raises(BundleError, match=r"matrix.mtx.gz: feature indices outside 1..3"):
        seq_scope.read(folder, wsi="he.tif")
    write_sge(folder, features=FEATURES[:2], dims=(3, 5, 5))
    with pytest.raises(BundleError, match="features.tsv.gz: lists 2 features but"):
        seq_scope.read(folder, wsi="he.tif")


def test_truncated_or_non_integer_matrix(tmp_path: Path) -> None:
    folder = write_sge(tmp_path / "sge", dims=(3, 5, 9))
    with pytest.raises(BundleError, match=r"matrix.mtx.gz: holds 5 entries but .* says 9"):
        seq_scope.read(folder, wsi="he.tif")
    write_sge(folder, entries=[(1, 1, 0.5, 1, 1, 0, 0)])
    message = r"matrix.mtx.gz: line \d+ \(column 3\): count 0.5 is not an integer"
    with pytest.raises(BundleError, match=message):
        seq_scope.read(folder, wsi="he.tif")
    write_sge(folder, entries=[(1, 1, 2**31, 1, 1, 0, 0)])
    message = r"matrix.mtx.gz: line \d+ \(column 3\): count 2147483648.0 is above the int32"
    with pytest.raises(BundleError, match=message):
        seq_scope.read(folder, wsi="he.tif")
    write_sge(folder, entries=[(1, 1, 2, 3)])
    with pytest.raises(BundleError, match="matrix.mtx.gz: entries have 4 columns"):
        seq_scope.read(folder, wsi="he.tif")


# -- a synthetic section end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth, Path]:
    root = tmp_path_factory.mktemp("seqscope")
    slide = make_slide(root / "he.tif", width_um=640.0, height_um=560.0, mpp=0.5, seed=11)
    truth = write_seq_scope_bundle(root / "run", slide, seed=11, n_genes=60)
    out = root / "corpus"
    request = SectionRequest("seq-scope", truth.bundle, slide.path, "ss-01", truth.transform_path)
    build_section(request, out, CONFIG)
    return slide, truth, out


def truth_bins(truth: GroundTruth, counts: sp.csr_matrix, bin_um: float) -> pd.DataFrame:
    """The truth's clusters summed into bins: centre (nm) and dense counts per unit id."""
    x_um, y_um = truth.x_native / 1000.0, truth.y_native / 1000.0
    col, row = np.floor(x_um / bin_um).astype(int), np.floor(y_um / bin_um).astype(int)
    ids = pd.Series([f"c{c}_r{r}" for c, r in zip(col, row, strict=True)])
    codes, uniques = pd.factorize(ids)
    summing = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))))
    dense = np.asarray((summing @ counts).todense(), dtype=np.int64)
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    bins = pd.DataFrame(
        {
            "x": (col[first] + 0.5) * bin_um * 1000.0,
            "y": (row[first] + 0.5) * bin_um * 1000.0,
            "counts": list(dense),
        },
        index=uniques,
    )
    return bins[dense.sum(axis=1) > 0]  # clusters listed for their other counts make no bin


def stored_units(out: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(out / "manifest.parquet")
    return pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])


def test_synthetic_section_counts_and_coordinates_are_exact(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path],
) -> None:
    _, truth, out = synthetic
    expected = truth_bins(truth, truth.counts, 8.0)
    units = stored_units(out).set_index("unit_id")
    row = pd.read_parquet(out / "sections.parquet").iloc[0]
    assert len(units) + row["qc_n_units_dropped_tissue"] == len(expected)
    assert units.index.isin(expected.index).all()
    centres = expected.loc[units.index]
    x, y = (truth.native_to_wsi @ np.stack([centres["x"], centres["y"], np.ones(len(units))]))[:2]
    np.testing.assert_allclose(units["x_wsi_px"], x, atol=1e-6)
    np.testing.assert_allclose(units["y_wsi_px"], y, atol=1e-6)
    column = truth_columns(truth.genes["gene_id"], truth.genes["symbol"])  # stable idx -> col
    got = np.zeros((len(units), len(truth.genes)), np.int64)
    for i, (genes, values) in enumerate(zip(units["gene_idx"], units["counts"], strict=True)):
        got[i, column.loc[np.asarray(genes)].to_numpy()] = values
    np.testing.assert_array_equal(got, np.stack(centres["counts"].to_numpy()))
    assert bool(row["qc_transform_mirrored"])  # NovaScope swaps x and y: a mirror, handled
    assert row["mpp_source"] == "embedded" and abs(row["qc_mpp_scalefactors_vs_pitch"]) < 1e-9


def test_gene_full_adds_the_unspliced_counts(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path],
) -> None:
    _, truth, _ = synthetic
    section = seq_scope.read(truth.bundle, wsi="he.tif", count_column="GeneFull")
    expected = truth_bins(truth, truth.counts + truth.extra["unspliced"], 8.0)
    assert section.units["unit_id"].tolist() == sorted(
        expected.index, key=lambda u: (int(u.split("_r")[1]), int(u[1:].split("_")[0]))
    )
    np.testing.assert_array_equal(
        section.counts.toarray(), np.stack(expected.loc[section.units["unit_id"], "counts"])
    )


def test_swapped_transform_axes_are_caught(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    slide, truth, _ = synthetic
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join(",".join(map(repr, r)) for r in truth.native_to_wsi[[1, 0, 2]]))
    request = SectionRequest("seq-scope", truth.bundle, slide.path, "bad", swapped)
    with pytest.raises((RegistrationError, QCError), match="transform"):
        build_section(request, tmp_path / "c", CONFIG)
    assert not (tmp_path / "c").exists()


def test_renamed_sge_file_is_named(
    synthetic: tuple[SyntheticSlide, GroundTruth, Path], tmp_path: Path
) -> None:
    _, truth, _ = synthetic
    copy = tmp_path / "run"
    shutil.copytree(truth.bundle, copy)
    (copy / "sge" / "barcodes.tsv.gz").rename(copy / "sge" / "barcode.tsv.gz")
    with pytest.raises(BundleError, match=r"run/sge: SGE folder lacks \['barcodes.tsv.gz'\]"):
        seq_scope.read(copy, wsi="he.tif")
