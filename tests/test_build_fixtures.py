"""End-to-end builds on the real public fixtures, and the bad-input rules of `build_section`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import fixture_path

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import ConfigError, CorpusError, QCError
from histmol.genes import gene_table
from histmol.shards.shard_reader import ShardReader

MOB1 = "legacy_st_stutility_MOB1/counts"
# MOB1.jpg states no usable pixel size and its 2k array has no documented pitch: the user gives
# one. 4.6 um/px is close to what the array frame implies; patches at 5 um/px suit the image.
MOB1_CONFIG = BuildConfig(mpp=4.6, target_mpp=5.0, patch_px=64)


def build_mob1(out: Path, **kwargs: object) -> object:
    folder = fixture_path(MOB1)
    request = SectionRequest("st", folder, folder / "MOB1.jpg", "mob1",
                             metadata={"tissue": "olfactory bulb"})
    return build_section(request, out, MOB1_CONFIG, **kwargs)  # type: ignore[arg-type]


def test_mob1_builds_end_to_end_with_exact_counts(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    result = build_mob1(out)
    assert (result.status, result.n_pairs, result.n_units, result.n_genes) == (
        "committed", 379, 379, 1000)
    sections = pd.read_parquet(out / "sections.parquet")
    row = sections.set_index("section_id").loc["mob1"]
    assert row["species"] == "mouse"  # inferred from the ENSMUSG ids
    assert row["mpp_source"] == "user" and row["mpp"] == 4.6
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["n_pairs"].sum() == 379
    units = pq.read_table(out / manifest["units_path"][0]).to_pandas()
    genes = pd.read_parquet(out / "genes.parquet")
    # counts of one spot equal the raw matrix, gene by gene
    counts = pd.read_csv(folder_counts(), sep="\t", index_col=0)
    spot = units.set_index("unit_id").loc["12x28"]
    ids = genes.set_index("index")["gene_id"]  # stable gene index -> reference Ensembl id
    stored = dict(zip(ids.loc[spot["gene_idx"]], spot["counts"], strict=True))
    raw = counts.loc["12x28"]
    # keys: the unversioned id, or the unresolved key of an id retired from Ensembl
    keys = dict(zip(counts.columns, gene_table(counts.columns, counts.columns)["gene_id"],
                    strict=True))
    assert stored == {keys[gene]: int(v) for gene, v in raw[raw > 0].items()}
    assert "unresolved:mouse:ENSMUSG00000098178" in stored  # retired from Ensembl
    assert row["qc_genes_resolved_fraction"] == 0.997  # 3 ids retired from Ensembl
    assert len(row["genes_unresolved"]) == 3
    assert spot["x_wsi_px"] == 506.25 and spot["y_wsi_px"] == 720.95
    # the patch is centred on the spot: centre of a 64 px patch
    assert spot["x_in_patch_px"] == pytest.approx(32.0)
    assert spot["y_in_patch_px"] == pytest.approx(32.0)
    with ShardReader(out / manifest["images_path"][0]) as reader:
        assert reader.n_pairs == 379
        assert reader.read_patch(int(spot["pair_index"])).shape == (64, 64, 3)


def folder_counts() -> Path:
    return fixture_path(MOB1) / "MOB1.tsv"


def test_rebuild_is_a_no_op_and_forced_rebuild_is_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    build_mob1(out)
    shard_dir = out / "shards" / "mob1"
    before = {p.relative_to(out): p.read_bytes()
              for p in sorted(shard_dir.rglob("*")) if p.is_file()}
    tables = {name: (out / name).read_bytes()
              for name in ("manifest.parquet", "genes.parquet", "sections.parquet")}
    assert build_mob1(out).status == "skipped"
    assert {name: (out / name).read_bytes() for name in tables} == tables
    assert build_mob1(out, force=True).status == "committed"
    after = {p.relative_to(out): p.read_bytes()
             for p in sorted(shard_dir.rglob("*")) if p.is_file()}
    assert after == before
    assert {name: (out / name).read_bytes() for name in tables} == tables


def test_changed_config_needs_force_and_other_patch_geometry_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    build_mob1(out)
    folder = fixture_path(MOB1)
    request = SectionRequest("st", folder, folder / "MOB1.jpg", "mob1")
    with pytest.raises(CorpusError, match="section 'mob1' is already in the corpus.*--force"):
        build_section(request, out, BuildConfig(mpp=4.7, target_mpp=5.0, patch_px=64))
    with pytest.raises(CorpusError,
                       match=r"corpus.json: corpus was built with another build config"):
        build_section(request, out, BuildConfig(mpp=4.6, target_mpp=5.0, patch_px=96))


def test_visium_lowres_image_is_too_coarse_and_nothing_is_written(tmp_path: Path) -> None:
    folder = fixture_path("visium_seurat")
    lowres = folder / "spatial" / "tissue_lowres_image.png"
    request = SectionRequest("visium", folder, lowres, "seurat")
    out = tmp_path / "corpus"
    with pytest.raises(QCError,
                       match=r"tissue_lowres_image.png: the image is too coarse for 0.5 um/px"):
        build_section(request, out)
    assert not out.exists()


def test_unsafe_section_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    folder = fixture_path(MOB1)
    with pytest.raises(ConfigError, match=r"'../x' is not a safe slug"):
        build_section(SectionRequest("st", folder, folder / "MOB1.jpg", "../x"), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_mob1_without_mpp_names_the_image(tmp_path: Path) -> None:
    folder = fixture_path(MOB1)
    request = SectionRequest("st", folder, folder / "MOB1.jpg", "mob1")
    with pytest.raises(Exception, match=r"MOB1.jpg: no usable pixel size.*pass --mpp"):
        build_section(request, tmp_path / "c", BuildConfig(target_mpp=5.0, patch_px=64))
    assert not (tmp_path / "c").exists()


def test_units_are_sorted_by_pair_and_pairs_follow_raster_order(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    build_mob1(out)
    units = pq.read_table(out / "shards" / "mob1" / "part-00000.parquet").to_pandas()
    assert np.all(np.diff(units["pair_index"]) >= 0)
    assert units["pair_index"].nunique() == 379


@pytest.mark.parametrize(
    ("platform", "bundle", "image"),
    [
        ("visium", "visium_spatialexperiment/section1/outs", "spatial/tissue_lowres_image.png"),
        ("visium", "visium_spatialexperiment/section2/outs", "spatial/tissue_lowres_image.png"),
        ("visium-hd", "visiumhd_visiumio_mousebrain",
         "binned_outputs/square_002um/spatial/tissue_lowres_image.png"),
    ],
)
def test_sparse_subsets_pass_the_pitch_check_from_their_array_indices(
    tmp_path: Path, platform: str, bundle: str, image: str
) -> None:
    # 50 scattered Visium spots / a handful of HD bins: the neighbour-distance estimate was
    # 558 % / 8107 % off the scalefactors; the array indices agree within 1 %.
    folder = fixture_path(bundle)
    request = SectionRequest(platform, folder, folder / image, "sparse")
    result = build_section(request, tmp_path / "c", BuildConfig(target_mpp=50.0, patch_px=16))
    assert result.status == "committed"
    assert result.qc["mpp_source"] == "scalefactors"
    assert result.qc["qc_pitch_source"] == "array_index"
    assert result.qc["qc_mpp_scalefactors_vs_pitch"] < 0.01
