"""Xenium adapter: the real public subset, synthetic XOA folders (cells, bins, alignment,
keypoints), malformed input, and end-to-end grid builds."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import scipy.io
import scipy.sparse as sp
from adapter_contract import AdapterContract, BundleCase
from conftest import fixture_path

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError, RegistrationError
from histmol.genes import control_category
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_xenium_bundle
from platform_adapters import load_reader, xenium

FIXTURE = "xenium_mousebrain_subset"
CONFIG = BuildConfig(patch_px=64)  # 32 um patches at 0.5 um/px


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth]:
    root = tmp_path_factory.mktemp("xenium")
    slide = make_slide(root / "he.tif", width_um=600.0, height_um=500.0, mpp=0.5, seed=5)
    return slide, write_xenium_bundle(root / "outs", slide, seed=5, n_genes=40)


def copy_bundle(truth: GroundTruth, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(truth.bundle, target)
    return target


def expected_bins(transcripts: pd.DataFrame, bin_um: float) -> pd.DataFrame:
    """Counts per (bin, feature) of qv >= 20 transcripts, computed independently."""
    good = transcripts[transcripts["qv"] >= 20].copy()
    good["col"] = np.floor(good["x_location"].astype(np.float64) / bin_um).astype(int)
    good["row"] = np.floor(good["y_location"].astype(np.float64) / bin_um).astype(int)
    return good.groupby(["col", "row", "feature_name"]).size().rename("n").reset_index()


def dense_by_symbol(section: xenium.Section) -> pd.DataFrame:
    return pd.DataFrame(section.counts.toarray(), index=section.units["unit_id"],
                        columns=section.genes["symbol"])


# -- contract --------------------------------------------------------------------------------


class TestXeniumContract(AdapterContract):
    platform = "xenium"

    @pytest.fixture
    def bundle(self, synthetic: tuple[SyntheticSlide, GroundTruth], tmp_path: Path) -> BundleCase:
        return copy_bundle(synthetic[1], tmp_path), {"units": "bins", "bin_um": 8.0}


# -- real public fixture ---------------------------------------------------------------------


def test_mousebrain_subset_cells_exact() -> None:
    folder = fixture_path(FIXTURE)
    section = xenium.read(folder, wsi="he.tif", native_to_wsi=np.eye(3))
    assert (section.n_units, section.n_genes) == (36602, 248)
    assert section.qc["cell_match_rate"] == 1.0 and section.qc["n_control_probes"] == 293
    with h5py.File(folder / "cell_feature_matrix.h5") as f:
        m = f["matrix"]
        raw = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]),
                            shape=tuple(m["shape"][()])).T.tocsr()
        names = [v.decode() for v in m["features/name"][()]]
        barcodes = [v.decode() for v in m["barcodes"][()]]
    assert section.units["unit_id"].tolist() == barcodes
    genes = [i for i, n in enumerate(names) if control_category(n) is None]
    assert section.genes["feature"].tolist() == [names[i] for i in genes]
    assert (section.counts != raw[:, genes]).nnz == 0
    for category in ("blank", "negative_codeword", "negative_probe"):
        columns = [i for i, n in enumerate(names) if control_category(n) == category]
        np.testing.assert_array_equal(section.control_counts[category],
                                      np.asarray(raw[:, columns].sum(axis=1)).ravel())
    assert section.control_counts.sum().to_dict() == {
        "blank": 5978, "negative_codeword": 377, "negative_probe": 3143}
    cells = pd.read_csv(folder / "cells.csv.gz", dtype={"cell_id": str}).set_index("cell_id")
    units = section.units.set_index("unit_id")
    np.testing.assert_array_equal(units["x_native"], cells.loc[units.index, "x_centroid"])
    np.testing.assert_array_equal(units["y_native"], cells.loc[units.index, "y_centroid"])
    first = units.loc["1", ["x_native", "y_native"]].tolist()
    assert first == pytest.approx([1898.8149, 2540.9631])
    median_area = np.median(cells["cell_area"])
    assert section.unit_size_um == pytest.approx(2 * np.sqrt(median_area / np.pi))
    assert section.unit_shape == "circle" and section.pitch_um is None
    assert section.native_um_per_unit == 1.0 and section.genes["gene_id"].str.startswith(
        "ENSMUSG").all()


def test_mousebrain_subset_without_alignment_names_the_missing_file(tmp_path: Path) -> None:
    folder = fixture_path(FIXTURE)
    message = rf"{folder}: no H&E alignment: looked for \*he_imagealignment\.csv .* in {folder}"
    with pytest.raises(BundleError, match=message):
        xenium.read(folder, wsi="he.tif")
    (tmp_path / "he.tif").write_bytes(b"not read: the adapter fails first")
    request = SectionRequest("xenium", folder, tmp_path / "he.tif", "brain")
    with pytest.raises(BundleError, match=message):
        build_section(request, tmp_path / "corpus", CONFIG)
    assert not (tmp_path / "corpus").exists()


def test_mousebrain_subset_bins_need_transcripts() -> None:
    folder = fixture_path(FIXTURE)
    with pytest.raises(BundleError, match="looked for transcripts.parquet, transcripts.csv.gz"):
        xenium.read(folder, wsi="he.tif", native_to_wsi=np.eye(3), units="bins")


def test_alignment_direction_follows_the_10x_worked_example(tmp_path: Path) -> None:
    """10x KB 'How can I convert coordinates between H&E image and Xenium data': this matrix
    sends the H&E's top-left pixel (0, 0) to Xenium px (807.98, 73097.66), i.e. that x 0.2125 um."""
    folder = fixture_path(FIXTURE)
    bundle = tmp_path / "outs"
    bundle.mkdir()
    for name in ("cell_feature_matrix.h5", "cells.csv.gz"):
        (bundle / name).symlink_to(folder / name)
    (bundle / "experiment.xenium").write_text('{"pixel_size": 0.2125}')
    (bundle / "sample_he_imagealignment.csv").write_text(
        "0.011071028838929093,1.2895790134339569,807.9788953065927\n"
        "-1.2895790134339569,0.011071028838929093,73097.655174759\n0,0,1\n")
    section = xenium.read(bundle, wsi="he.tif")
    corner_um = np.array([807.9788953065927 * 0.2125, 73097.655174759 * 0.2125, 1.0])
    np.testing.assert_allclose(section.native_to_wsi @ corner_um, [0.0, 0.0, 1.0], atol=1e-6)
    # one H&E px spans 1.28963 morphology px = 0.274 um: the H&E mpp the transform implies
    scale = np.sqrt(abs(np.linalg.det(section.native_to_wsi[:2, :2])))
    assert 1.0 / scale == pytest.approx(0.2125 * np.hypot(0.011071028838929093, 1.2895790134339569))


# -- synthetic: cells and placement ----------------------------------------------------------


def test_cells_equal_the_truth(synthetic: tuple[SyntheticSlide, GroundTruth]) -> None:
    slide, truth = synthetic
    section = load_reader("xenium")(truth.bundle, wsi=slide.path)
    assert section.units["unit_id"].tolist() == truth.unit_ids.tolist()
    np.testing.assert_array_equal(section.units["x_native"], truth.x_native)
    np.testing.assert_array_equal(section.units["y_native"], truth.y_native)
    # um -> H&E px = inv(alignment) @ diag(1/pixel_size): the known synthetic transform
    np.testing.assert_allclose(section.native_to_wsi, truth.native_to_wsi, rtol=0, atol=1e-9)
    kinds = truth.genes["feature_type"].to_numpy()
    genes = np.flatnonzero(kinds == "Gene Expression")
    assert section.genes["gene_id"].tolist() == truth.genes["gene_id"].iloc[genes].tolist()
    assert (section.counts != truth.counts[:, genes]).nnz == 0
    for category, kind in (("negative_probe", "Negative Control Probe"),
                           ("negative_codeword", "Negative Control Codeword"),
                           ("unassigned", "Unassigned Codeword")):
        expected = np.asarray(truth.counts[:, np.flatnonzero(kinds == kind)].sum(axis=1)).ravel()
        np.testing.assert_array_equal(section.control_counts[category], expected)
    assert section.unit_size_um == pytest.approx(truth.unit_size_um)
    assert section.qc["placement"] == "alignment_matrix"
    assert section.provenance.layout == "xenium-2.0.0.10"


def test_mex_matrix_reads_like_the_h5(synthetic: tuple[SyntheticSlide, GroundTruth],
                                      tmp_path: Path) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    (bundle / "cell_feature_matrix.h5").unlink()
    mex = bundle / "cell_feature_matrix"
    mex.mkdir()
    with gzip.open(mex / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(truth.counts.T), field="integer")
    features = truth.genes[["gene_id", "symbol", "feature_type"]]
    features.to_csv(mex / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(truth.unit_ids).to_csv(mex / "barcodes.tsv.gz", header=False, index=False)
    from_mex = xenium.read(bundle, wsi=slide.path)
    from_h5 = xenium.read(truth.bundle, wsi=slide.path)
    assert from_mex.qc["matrix_source"] == "cell_feature_matrix"
    pd.testing.assert_frame_equal(from_mex.units, from_h5.units)
    pd.testing.assert_frame_equal(from_mex.genes, from_h5.genes)
    assert (from_mex.counts != from_h5.counts).nnz == 0
    pd.testing.assert_frame_equal(from_mex.control_counts, from_h5.control_counts)


def test_keypoints_fit_over_all_pairs(synthetic: tuple[SyntheticSlide, GroundTruth],
                                      tmp_path: Path) -> None:
    slide, truth = synthetic
    keypoints = truth.extra["keypoints"]
    section = xenium.read(truth.bundle, wsi=slide.path, keypoints=keypoints)
    np.testing.assert_allclose(section.native_to_wsi, truth.native_to_wsi, atol=1e-9)
    assert section.qc["keypoints_n"] == 6 and section.qc["keypoints_max_um"] < 1e-9
    # Xenium Explorer >= 2.0 may save keypoints under the alignment file's name
    bundle = copy_bundle(truth, tmp_path)
    shutil.copyfile(keypoints, bundle / "synthetic_xenium_he_imagealignment.csv")
    auto = xenium.read(bundle, wsi=slide.path)
    assert auto.qc["placement"] == "keypoints_fit"
    np.testing.assert_allclose(auto.native_to_wsi, truth.native_to_wsi, atol=1e-9)
    # a 2 um click error on one pair is averaged, not refused
    table = pd.read_csv(keypoints)
    table.loc[3, "fixedX"] += 2.0 / 0.2125
    table.to_csv(tmp_path / "noisy.csv", index=False)
    noisy = xenium.read(truth.bundle, wsi=slide.path, keypoints=tmp_path / "noisy.csv")
    assert 0 < noisy.qc["keypoints_max_um"] < 2.0


def test_bad_keypoints_are_refused(synthetic: tuple[SyntheticSlide, GroundTruth],
                                   tmp_path: Path) -> None:
    slide, truth = synthetic
    table = pd.read_csv(truth.extra["keypoints"])
    far, few = tmp_path / "far.csv", tmp_path / "few.csv"
    moved = table.copy()
    moved.loc[2, "fixedY"] += 500.0  # 106 um off, at the centre (low leverage)
    moved.to_csv(far, index=False)
    with pytest.raises(RegistrationError, match=rf"{far}: landmark pair 2 lies .* limit 25 um"):
        xenium.read(truth.bundle, wsi=slide.path, keypoints=far)
    table.head(2).to_csv(few, index=False)
    with pytest.raises(RegistrationError, match=rf"{few}: 2 point pair.*at least 3"):
        xenium.read(truth.bundle, wsi=slide.path, keypoints=few)
    table.drop(columns="alignmentY").to_csv(few, index=False)
    with pytest.raises(BundleError, match="lacks columns \\['alignmentY'\\]"):
        xenium.read(truth.bundle, wsi=slide.path, keypoints=few)


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        ("1,2,3\n2,4,6\n0,0,1\n", RegistrationError, "singular"),
        ("-4.7,0,100\n0,4.7,50\n0,0,1\n", RegistrationError, "mirrors the image"),
        ("4.7,0,100\n0,4.7,50\n0.1,0,1\n", RegistrationError, "not affine"),
        ("4.7,0,100\n0,4.7,50\n", BundleError, "9 numbers"),
    ],
)
def test_bad_alignment_matrix_names_the_file(
    synthetic: tuple[SyntheticSlide, GroundTruth], tmp_path: Path, rows: str,
    error: type[Exception], message: str,
) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    alignment = bundle / "synthetic_xenium_he_imagealignment.csv"
    alignment.write_text(rows)
    with pytest.raises(error, match=message) as caught:
        xenium.read(bundle, wsi=slide.path)
    assert str(alignment) in str(caught.value)


def test_alignment_needs_experiment_pixel_size(synthetic: tuple[SyntheticSlide, GroundTruth],
                                               tmp_path: Path) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    (bundle / "experiment.xenium").unlink()
    with pytest.raises(BundleError, match=r"experiment.xenium: missing; its pixel_size"):
        xenium.read(bundle, wsi=slide.path)
    assert xenium.read(bundle, wsi=slide.path, native_to_wsi=np.eye(3)).n_units > 0


def test_option_conflicts_are_config_errors(synthetic: tuple[SyntheticSlide, GroundTruth]) -> None:
    slide, truth = synthetic
    with pytest.raises(ConfigError, match="alignment or keypoints, not both"):
        xenium.read(truth.bundle, wsi=slide.path, alignment=truth.transform_path,
                    keypoints=truth.extra["keypoints"])
    with pytest.raises(ConfigError, match="units must be"):
        xenium.read(truth.bundle, wsi=slide.path, units="spots")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bin_um"):
        xenium.read(truth.bundle, wsi=slide.path, units="bins", bin_um=0)


# -- synthetic: bins -------------------------------------------------------------------------


@pytest.mark.parametrize("bin_um", [8.0, 13.0])
def test_bins_equal_an_independent_binning(synthetic: tuple[SyntheticSlide, GroundTruth],
                                           bin_um: float) -> None:
    slide, truth = synthetic
    section = xenium.read(truth.bundle, wsi=slide.path, units="bins", bin_um=bin_um)
    transcripts = pq.read_table(truth.extra["transcripts"]).to_pandas()
    expected = expected_bins(transcripts, bin_um)
    is_control = expected["feature_name"].map(control_category).notna()
    genes = expected[~is_control]
    assert section.n_units == len(genes.groupby(["col", "row"]))
    assert section.qc["n_transcripts"] == truth.extra["n_transcripts"]
    assert section.qc["n_transcripts_below_qv"] == (transcripts["qv"] < 20).sum()
    assert section.qc["n_transcripts_control"] == expected.loc[is_control, "n"].sum()
    units = section.units.set_index("unit_id")
    ids = [f"bin{bin_um:g}_{c}_{r}" for c, r in zip(genes["col"], genes["row"], strict=True)]
    dense = dense_by_symbol(section)
    columns = dense.columns.get_indexer(genes["feature_name"])
    got = dense.to_numpy()[dense.index.get_indexer(ids), columns]
    np.testing.assert_array_equal(got, genes["n"].to_numpy())
    assert int(section.counts.sum()) == genes["n"].sum()
    np.testing.assert_array_equal(units["x_native"], (units["bin_col"] + 0.5) * bin_um)
    np.testing.assert_array_equal(units["y_native"], (units["bin_row"] + 0.5) * bin_um)
    geometry = (section.unit_shape, section.unit_size_um, section.pitch_um)
    assert geometry == ("square", bin_um, bin_um)
    # controls of the kept bins, per category
    controls = expected[is_control].assign(
        category=lambda d: d["feature_name"].map(control_category))
    per_bin = controls.groupby(["col", "row", "category"])["n"].sum()
    for (col, row, category), n in per_bin.items():
        name = f"bin{bin_um:g}_{col}_{row}"
        if name in units.index:
            assert section.control_counts[category].iloc[units.index.get_loc(name)] == n


def test_binning_streams_in_batches_with_the_same_result(
    synthetic: tuple[SyntheticSlide, GroundTruth], monkeypatch: pytest.MonkeyPatch
) -> None:
    slide, truth = synthetic
    whole = xenium.read(truth.bundle, wsi=slide.path, units="bins")
    monkeypatch.setattr(xenium, "BATCH_ROWS", 997)
    batched = xenium.read(truth.bundle, wsi=slide.path, units="bins")
    pd.testing.assert_frame_equal(whole.units, batched.units)
    assert (whole.counts.tocsr() != batched.counts.tocsr()).nnz == 0
    pd.testing.assert_frame_equal(whole.control_counts, batched.control_counts)


def test_transcripts_csv_gz_bins_like_parquet(synthetic: tuple[SyntheticSlide, GroundTruth],
                                              tmp_path: Path) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    table = pq.read_table(bundle / "transcripts.parquet").to_pandas()
    with gzip.open(bundle / "transcripts.csv.gz", "wt") as handle:
        table.to_csv(handle, index=False, float_format="%.9g")
    (bundle / "transcripts.parquet").unlink()
    from_csv = xenium.read(bundle, wsi=slide.path, units="bins")
    from_parquet = xenium.read(truth.bundle, wsi=slide.path, units="bins")
    assert from_csv.qc["transcripts_source"] == "transcripts.csv.gz"
    pd.testing.assert_frame_equal(from_csv.units, from_parquet.units)
    assert (from_csv.counts.tocsr() != from_parquet.counts.tocsr()).nnz == 0


def test_low_min_qv_keeps_more_transcripts(synthetic: tuple[SyntheticSlide, GroundTruth]) -> None:
    slide, truth = synthetic
    default = xenium.read(truth.bundle, wsi=slide.path, units="bins")
    everything = xenium.read(truth.bundle, wsi=slide.path, units="bins", min_qv=0)
    assert everything.qc["n_transcripts_below_qv"] == 0
    added = everything.counts.sum() + everything.control_counts.to_numpy().sum()
    kept = default.counts.sum() + default.control_counts.to_numpy().sum()
    assert added > kept


@pytest.mark.parametrize("name", ["transcripts.parquet", "cell_feature_matrix.h5"])
def test_truncated_files_are_named(synthetic: tuple[SyntheticSlide, GroundTruth],
                                   tmp_path: Path, name: str) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    data = (bundle / name).read_bytes()
    (bundle / name).write_bytes(data[: len(data) // 2])
    units = "bins" if name.startswith("transcripts") else "cells"
    with pytest.raises(BundleError, match=str(bundle / name)):
        xenium.read(bundle, wsi=slide.path, units=units)  # type: ignore[arg-type]


def test_missing_transcript_column_is_named(synthetic: tuple[SyntheticSlide, GroundTruth],
                                            tmp_path: Path) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    table = pq.read_table(bundle / "transcripts.parquet").drop_columns(["qv"])
    pq.write_table(table, bundle / "transcripts.parquet")
    with pytest.raises(BundleError, match=r"lacks columns \['qv'\]"):
        xenium.read(bundle, wsi=slide.path, units="bins")


def test_transcripts_not_in_micrometres_are_named(synthetic: tuple[SyntheticSlide, GroundTruth],
                                                  tmp_path: Path) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    table = pq.read_table(bundle / "transcripts.parquet")
    x = table.column("x_location")
    table = table.set_column(table.schema.get_field_index("x_location"), "x_location",
                             pc.multiply(x, 1e5))  # far beyond any slide in um
    pq.write_table(table, bundle / "transcripts.parquet")
    with pytest.raises(BundleError, match=r"transcripts.parquet.*x_location / y_location: bin "
                                          r"index beyond.*not micrometres"):
        xenium.read(bundle, wsi=slide.path, units="bins")


# -- end to end ------------------------------------------------------------------------------


def stored_units(out: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(out / "manifest.parquet")
    return pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])


@pytest.mark.parametrize("units", ["cells", "bins"])
def test_grid_build_places_units_and_keeps_every_count(
    synthetic: tuple[SyntheticSlide, GroundTruth], tmp_path: Path, units: str
) -> None:
    slide, truth = synthetic
    out = tmp_path / "corpus"
    request = SectionRequest("xenium", truth.bundle, slide.path, f"xen-{units}",
                             options={"units": units, "bin_um": 8.0})
    result = build_section(request, out, CONFIG)
    section = xenium.read(truth.bundle, wsi=slide.path, units=units)  # type: ignore[arg-type]
    stored = stored_units(out).set_index("unit_id")
    row = pd.read_parquet(out / "sections.parquet").iloc[0]
    assert row["qc_mode"] == "grid" and result.n_pairs < result.n_units
    assert len(stored) + row["qc_n_units_dropped_tissue"] == section.n_units
    counts = section.count_rows(np.arange(section.n_units))
    totals = pd.Series(np.asarray(counts.sum(axis=1)).ravel(), index=section.units["unit_id"])
    assert stored["total_counts"].sum() == totals.loc[stored.index].sum()
    # the H&E mpp comes from the alignment (scalefactors) and agrees with the slide's own
    assert row["mpp_source"] == "embedded" and row["qc_mpp_scalefactors"] == pytest.approx(0.5)
    native = section.units.set_index("unit_id").loc[stored.index]
    m = truth.native_to_wsi
    x_wsi = m[0, 0] * native["x_native"] + m[0, 1] * native["y_native"] + m[0, 2]
    np.testing.assert_allclose(stored["x_wsi_px"], x_wsi, atol=1e-6)
    if units == "cells":
        index = pd.Series(np.arange(len(truth.unit_ids)), index=truth.unit_ids)
        rows = index.loc[stored.index].to_numpy()
        np.testing.assert_allclose(stored["x_wsi_px"], truth.x_wsi_px[rows], atol=1e-6)
        np.testing.assert_allclose(stored["y_wsi_px"], truth.y_wsi_px[rows], atol=1e-6)


def test_transcripts_outside_the_image_fail_the_build(
    synthetic: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = synthetic
    bundle = copy_bundle(truth, tmp_path)
    alignment = bundle / "synthetic_xenium_he_imagealignment.csv"
    matrix = np.loadtxt(alignment, delimiter=",")
    matrix[0, 2] += 2000.0  # the H&E now sits 425 um to the right of the transcripts
    np.savetxt(alignment, matrix, delimiter=",")
    request = SectionRequest("xenium", bundle, slide.path, "outside", options={"units": "bins"})
    with pytest.raises(RegistrationError, match=r"he.tif: \d+ of \d+ unit centres fall outside"):
        build_section(request, tmp_path / "corpus", CONFIG)
    assert not (tmp_path / "corpus").exists()
