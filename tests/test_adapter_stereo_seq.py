"""Stereo-seq adapter: the real spateo GEM, synthetic SAW v7 / v8 GEM and GEF bundles (bins and
cellbin), offsets, the fluorescence-image rule, malformed input and an end-to-end grid build."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from adapter_contract import AdapterContract, BundleCase
from conftest import fixture_path
from gene_space_helpers import truth_columns

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import BundleError, ConfigError, WSIError
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_stereo_seq_bundle
from platform_adapters import stereo_seq

FIXTURE = "stereoseq_spateo/bgi"
GEM_NAME = "SS200000135TL_D1_bin1_small.gem.gz"


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    root = tmp_path_factory.mktemp("stereo")
    return make_slide(root / "slide.tif", width_um=400.0, height_um=320.0, mpp=0.5, seed=9)


@pytest.fixture(scope="module")
def bundles(
    slide: SyntheticSlide, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, GroundTruth]:
    root = tmp_path_factory.mktemp("saw")
    cases = {"gem8": ("gem", 8), "gem7": ("gem", 7), "gef8": ("gef", 8), "gef7": ("gef", 7)}
    return {name: write_stereo_seq_bundle(root / name, slide, seed=9, n_genes=40, matrix=matrix,
                                          saw_version=version, cellbin=name == "gef8")
            for name, (matrix, version) in cases.items()}


@pytest.fixture
def rgb_image(tmp_path: Path) -> Path:
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    return path


def bin1_table(section: stereo_seq.Section, names: np.ndarray | None = None) -> pd.DataFrame:
    """(x, y, gene name) -> count of a bin1 section, in chip coordinates (names: per gene)."""
    names = section.genes["feature"].to_numpy() if names is None else names
    coo = section.counts.tocoo()
    return pd.DataFrame({
        "x": section.units["x_native"].to_numpy()[coo.row] - 0.5,
        "y": section.units["y_native"].to_numpy()[coo.row] - 0.5,
        "gene": names[coo.col], "n": coo.data,
    }).sort_values(["x", "y", "gene"]).reset_index(drop=True)


def truth_table(truth: GroundTruth, key: str) -> pd.DataFrame:
    coo = truth.counts.tocoo()
    return pd.DataFrame({
        "x": truth.x_native[coo.row] - 0.5, "y": truth.y_native[coo.row] - 0.5,
        "gene": truth.genes[key].to_numpy()[coo.col], "n": coo.data,
    }).sort_values(["x", "y", "gene"]).reset_index(drop=True)


# -- contract --------------------------------------------------------------------------------


class TestStereoSeqContract(AdapterContract):
    platform = "stereo-seq"

    @pytest.fixture
    def bundle(self, bundles: dict[str, GroundTruth], tmp_path: Path) -> BundleCase:
        target = tmp_path / "saw"
        shutil.copytree(bundles["gem8"].bundle, target)
        return target, {"wsi": target / "SS200000135TL_D1_HE_regist.tif"}


# -- real public fixture ---------------------------------------------------------------------


def test_spateo_gem_bin1_exact(rgb_image: Path) -> None:
    folder = fixture_path(FIXTURE)
    section = stereo_seq.read(folder, wsi=rgb_image, bin_um=0.5)
    assert (section.n_units, section.n_genes) == (41915, 10631)
    assert int(section.counts.sum()) == 131002 and section.qc["n_matrix_rows"] == 77634
    assert section.qc["matrix_layout"] == "gem-no-header"  # no header: chip coordinates
    assert (section.qc["offset_x"], section.qc["offset_y"]) == (0, 0)
    assert section.native_um_per_unit == 0.5 and section.native_to_wsi is None
    raw = pd.read_csv(folder / GEM_NAME, sep="\t")
    expected = raw.rename(columns={"geneID": "gene", "MIDCounts": "n"}).groupby(
        ["x", "y", "gene"], as_index=False)["n"].sum().sort_values(["x", "y", "gene"])
    pd.testing.assert_frame_equal(bin1_table(section), expected.reset_index(drop=True),
                                  check_dtype=False)
    first = section.units.iloc[0]
    assert (first["unit_id"], first["x_native"], first["y_native"]) == ("bin1_9600_12600",
                                                                        9600.5, 12600.5)


def test_spateo_gem_default_bins(rgb_image: Path) -> None:
    section = stereo_seq.read(fixture_path(FIXTURE), wsi=rgb_image)
    raw = pd.read_csv(fixture_path(FIXTURE) / GEM_NAME, sep="\t")
    bins = raw.assign(c=raw["x"] // 50, r=raw["y"] // 50).groupby(["c", "r"])["MIDCounts"].sum()
    assert section.n_units == len(bins) == 36 and section.qc["bin_dnb"] == 50
    totals = pd.Series(np.asarray(section.counts.sum(axis=1)).ravel(),
                       index=list(zip(section.units["bin_col"], section.units["bin_row"],
                                      strict=True)))
    assert totals.to_dict() == {k: int(v) for k, v in bins.items()}
    np.testing.assert_array_equal(section.units["x_native"], section.units["bin_col"] * 50 + 25)
    assert (section.unit_shape, section.unit_size_um, section.pitch_um) == ("square", 25.0, 25.0)


# -- synthetic SAW outputs -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gem8", "gem7", "gef8", "gef7"])
def test_bin1_equals_the_truth(bundles: dict[str, GroundTruth], name: str) -> None:
    truth = bundles[name]
    section = stereo_seq.read(truth.bundle, wsi=truth.wsi_path, bin_um=0.5)
    assert section.n_units == len(truth.unit_ids)
    # SAW v8 has Ensembl ids and names; SAW v7 names only (they become the gene keys)
    key = "gene_id" if name.endswith("8") else "symbol"
    # each section gene is one truth gene (resolved as the adapter resolves them)
    column = section.genes["index"].map(truth_columns(truth.genes[key], truth.genes["symbol"]))
    names = truth.genes[key].to_numpy()[column.to_numpy()]
    assert len(set(names)) == len(truth.genes) == section.n_genes
    pd.testing.assert_frame_equal(bin1_table(section, names), truth_table(truth, key),
                                  check_dtype=False)
    offset = truth.extra["offset"]
    assert (section.qc["offset_x"], section.qc["offset_y"]) == offset and offset != (0, 0)


def test_gem_and_gef_give_the_same_bins(bundles: dict[str, GroundTruth]) -> None:
    gem = stereo_seq.read(bundles["gem8"].bundle, wsi=bundles["gem8"].wsi_path, bin_um=8.0)
    gef = stereo_seq.read(bundles["gef8"].bundle, wsi=bundles["gef8"].wsi_path, bin_um=8.0)
    pd.testing.assert_frame_equal(gem.units, gef.units)
    assert (gem.counts != gef.counts).nnz == 0
    assert gem.genes.equals(gef.genes)
    truth = bundles["gem8"]
    offset = np.array(truth.extra["offset"])
    # bins anchored at the offset: 16 DNBs per side
    col = (truth.x_native - 0.5 - offset[0]) // 16
    expected = pd.Series(np.asarray(truth.counts.sum(axis=1)).ravel()).groupby(
        [col, (truth.y_native - 0.5 - offset[1]) // 16]).sum()
    assert gem.n_units == len(expected) and int(gem.counts.sum()) == expected.sum()
    np.testing.assert_array_equal(gem.units["x_native"], gem.units["bin_col"] * 16 + 8 + offset[0])


def test_cellbin_gef_cells_equal_the_truth(bundles: dict[str, GroundTruth]) -> None:
    truth = bundles["gef8"]
    section = stereo_seq.read(truth.bundle, wsi=truth.wsi_path, units="cells")
    extra = truth.extra
    assert section.units["unit_id"].tolist() == list(extra["cell_ids"])
    np.testing.assert_array_equal(section.units["x_native"], extra["cell_x_native"])
    np.testing.assert_array_equal(section.units["y_native"], extra["cell_y_native"])
    np.testing.assert_array_equal(section.units["cell_area_um2"], extra["cell_area_um2"])
    order = section.genes["index"].map(
        truth_columns(truth.genes["gene_id"], truth.genes["symbol"])).to_numpy()
    assert sorted(order) == list(range(len(truth.genes)))
    assert (section.counts != extra["cell_counts"][:, order]).nnz == 0
    area = np.median(extra["cell_area_um2"])
    assert section.unit_size_um == pytest.approx(2 * np.sqrt(area / np.pi))
    assert (section.unit_shape, section.pitch_um) == ("circle", None)


def test_several_matrices_need_a_choice(bundles: dict[str, GroundTruth], tmp_path: Path) -> None:
    bundle = tmp_path / "saw"
    shutil.copytree(bundles["gem8"].bundle, bundle)
    shutil.copyfile(bundle / "SS200000135TL_D1.tissue.gem.gz", bundle / "other.tissue.gem.gz")
    with pytest.raises(BundleError, match="several expression matrices"):
        stereo_seq.read(bundle, wsi=bundles["gem8"].wsi_path)
    chosen = stereo_seq.read(bundle, wsi=bundles["gem8"].wsi_path,
                             matrix=bundle / "other.tissue.gem.gz")
    assert chosen.qc["matrix_source"] == "other.tissue.gem.gz"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match=r"no expression matrix: looked for \*.tissue.gef"):
        stereo_seq.read(empty, wsi=bundles["gem8"].wsi_path)


# -- bad input -------------------------------------------------------------------------------


def rewrite_gem(path: Path, edit: callable) -> None:  # type: ignore[valid-type]
    lines = gzip.decompress(path.read_bytes()).decode().splitlines(keepends=True)
    path.write_bytes(gzip.compress("".join(edit(lines)).encode()))


def test_gem_header_without_offsets_is_refused(bundles: dict[str, GroundTruth],
                                               tmp_path: Path) -> None:
    bundle = tmp_path / "saw"
    shutil.copytree(bundles["gem8"].bundle, bundle)
    gem = bundle / "SS200000135TL_D1.tissue.gem.gz"
    rewrite_gem(gem, lambda lines: [ln for ln in lines if not ln.startswith("#OffsetY")])
    with pytest.raises(BundleError, match=rf"{gem}: GEM header lacks \['#OffsetY'\]"):
        stereo_seq.read(bundle, wsi=bundles["gem8"].wsi_path)


def test_non_integer_or_huge_counts_are_named(bundles: dict[str, GroundTruth],
                                              tmp_path: Path) -> None:
    bundle = tmp_path / "gem"
    shutil.copytree(bundles["gem8"].bundle, bundle)
    gem = bundle / "SS200000135TL_D1.tissue.gem.gz"
    lines = gzip.decompress(gem.read_bytes()).decode().splitlines(keepends=True)
    last = len(lines)  # 1-based line number of the last entry
    fields = lines[-1].split("\t")
    fields[4] = "2.5"  # geneID, geneName, x, y, MIDCount[, ExonCount]
    rewrite_gem(gem, lambda lines: [*lines[:-1], "\t".join(fields)])
    message = rf"{gem}: line {last} \(MIDCount\): count 2.5 is not an integer"
    with pytest.raises(BundleError, match=message):
        stereo_seq.read(bundle, wsi=bundles["gem8"].wsi_path)
    bundle = tmp_path / "gef"
    shutil.copytree(bundles["gef7"].bundle, bundle)
    gef = bundle / "SS200000135TL_D1.tissue.gef"
    with h5py.File(gef, "r+") as handle:  # counts stored as float, one of them 2.5
        group = handle["geneExp/bin1"]
        old = group["expression"]
        attrs, rows = dict(old.attrs), old[()]
        dtype = np.dtype([(n, np.float32 if n == "count" else rows.dtype[n])
                          for n in rows.dtype.names])
        rows = rows.astype(dtype)
        rows["count"][3] = 2.5
        del group["expression"]
        group.create_dataset("expression", data=rows).attrs.update(attrs)
    message = rf"{gef}: geneExp/bin1/expression row 3 \(count\): count 2.5 is not an integer"
    with pytest.raises(BundleError, match=message):
        stereo_seq.read(bundle, wsi=bundles["gef7"].wsi_path)


def test_truncated_matrices_are_named(bundles: dict[str, GroundTruth], tmp_path: Path) -> None:
    for name, file in (("gem8", "SS200000135TL_D1.tissue.gem.gz"),
                       ("gef8", "SS200000135TL_D1.tissue.gef")):
        bundle = tmp_path / name
        shutil.copytree(bundles[name].bundle, bundle)
        data = (bundle / file).read_bytes()
        (bundle / file).write_bytes(data[: len(data) // 2])
        with pytest.raises(BundleError, match=str(bundle / file)):
            stereo_seq.read(bundle, wsi=bundles[name].wsi_path, matrix=bundle / file)


def test_bad_columns_and_bin_sizes(bundles: dict[str, GroundTruth], tmp_path: Path) -> None:
    truth = bundles["gem7"]
    with pytest.raises(ConfigError, match="not a whole number of 0.5 um DNBs"):
        stereo_seq.read(truth.bundle, wsi=truth.wsi_path, bin_um=8.25)
    bundle = tmp_path / "saw"
    shutil.copytree(truth.bundle, bundle)
    gem = bundle / "SS200000135TL_D1.tissue.gem.gz"
    rewrite_gem(gem, lambda lines: [ln.replace("MIDCount", "Count") for ln in lines])
    with pytest.raises(BundleError, match=r"GEM lacks columns \['MIDCount'\]"):
        stereo_seq.read(bundle, wsi=truth.wsi_path)


@pytest.mark.parametrize("tiled", [False, True])
def test_fluorescence_image_is_refused_unless_allowed(
    bundles: dict[str, GroundTruth], tmp_path: Path, tiled: bool
) -> None:
    truth = bundles["gem8"]
    image = tmp_path / "SS200000135TL_D1_ssDNA_regist.tif"
    grey = np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8)
    tifffile.imwrite(image, grey, photometric="minisblack", tile=(256, 256) if tiled else None)
    with pytest.raises(WSIError, match=rf"{image}: .*ssDNA or DAPI.*allow_fluorescence=True"):
        stereo_seq.read(truth.bundle, wsi=image)
    allowed = stereo_seq.read(truth.bundle, wsi=image, allow_fluorescence=True)
    assert allowed.qc["image_channels"] == "not checked (allow_fluorescence)"
    with pytest.raises(WSIError, match="file not found"):
        stereo_seq.read(truth.bundle, wsi=tmp_path / "missing.tif")


# -- end to end ------------------------------------------------------------------------------


def test_grid_build_places_bins_on_the_regist_image(bundles: dict[str, GroundTruth],
                                                    tmp_path: Path) -> None:
    truth = bundles["gef8"]
    out = tmp_path / "corpus"
    request = SectionRequest("stereo-seq", truth.bundle, truth.wsi_path, "chip-1",
                             options={"bin_um": 8.0})
    build_section(request, out, BuildConfig(patch_px=64))
    section = stereo_seq.read(truth.bundle, wsi=truth.wsi_path, bin_um=8.0)
    manifest = pd.read_parquet(out / "manifest.parquet")
    stored = pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])
    row = pd.read_parquet(out / "sections.parquet").iloc[0]
    assert len(stored) + row["qc_n_units_dropped_tissue"] == section.n_units
    native = section.units.set_index("unit_id").loc[stored["unit_id"]]
    # the regist.tif is the chip: one px per DNB, so WSI px = chip DNB coordinates
    np.testing.assert_array_equal(stored["x_wsi_px"], native["x_native"])
    np.testing.assert_array_equal(stored["y_wsi_px"], native["y_native"])
    assert row["mpp"] == 0.5 and row["qc_mpp_scalefactors"] == pytest.approx(0.5)
    totals = pd.Series(np.asarray(section.counts.sum(axis=1)).ravel(),
                       index=section.units["unit_id"])
    assert stored["total_counts"].sum() == totals.loc[stored["unit_id"]].sum()
    with h5py.File(truth.extra["matrix"]) as f:  # the GEF's own offset put bins on the chip
        assert int(f["geneExp/bin1/expression"].attrs["minX"]) == truth.extra["offset"][0]
