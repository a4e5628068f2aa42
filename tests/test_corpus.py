"""Corpus: vocabulary, commits, crash-safe ordering, cleanup, concurrency, removal."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histmol.errors import CorpusError
from histmol.gene_reference import reference, tail_index, unresolved_key
from histmol.shards.corpus import Corpus
from histmol.shards.corpus_tables import GENES_SCHEMA, MANIFEST_SCHEMA
from histmol.shards.fragments import commit_fragment, local_store, section_view
from histmol.shards.shard_reader import ShardReader
from histmol.shards.shard_writer import SectionShardWriter, ShardRecord

PX = 32


def gene_frame(ids: list[str]) -> pd.DataFrame:
    """A raw gene table: ids double as names (made-up ones resolve to unresolved keys)."""
    return pd.DataFrame({"gene_id": ids, "symbol": ids, "ensembl_id": [None] * len(ids)})


def tail(corpus: Corpus) -> pd.DataFrame:
    """The corpus' unresolved-key rows (genes.parquet past the reference)."""
    genes = corpus.genes()
    return genes[genes["kind"] == "unresolved"].reset_index(drop=True)


def ref_index(ensembl_id: str) -> int:
    """A gene's stable index: its row in the shipped reference."""
    return int(reference().ensembl.get_loc(ensembl_id))


def key_index(name: str, species: str = "human") -> int:
    return tail_index(unresolved_key(species, name))


def stage_section(
    corpus: Corpus, section_id: str, n_pairs: int, gene_idx: np.ndarray, *, seed: int = 0
) -> tuple[Path, list[ShardRecord]]:
    staging = corpus.staging_dir(section_id)
    rng = np.random.default_rng(seed)
    with SectionShardWriter(staging, patch_px=PX, pairs_per_shard=2) as writer:
        for i in range(n_pairs):
            patch = rng.integers(0, 255, (PX, PX, 3), dtype=np.uint8)
            writer.add_pair(patch, {
                "unit_id": [f"{section_id}-{i}"],
                "gene_idx": [gene_idx.astype(np.int32)],
                "counts": [np.ones(len(gene_idx), dtype=np.int32)],
            })
    return staging, writer.close()


def build(
    corpus: Corpus, section_id: str, genes: list[str], n_pairs: int = 3, *,
    force: bool = False, species: str = "human", **extra: Any,
) -> dict[str, Any]:
    indices = corpus.map_genes(gene_frame(genes), species)
    staging, records = stage_section(corpus, section_id, n_pairs, indices)
    row = {"platform": "visium", "panel": indices, "config_hash": "c1",
           "input_fingerprint": f"fp-{section_id}", **extra}
    return corpus.commit_section(section_id, staging, records=records, row=row, force=force)


def test_create_open_and_config_clash(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not a histmol corpus"):
        Corpus.open(tmp_path / "c")
    corpus = Corpus.open(tmp_path / "c", create=True, build_config={"patch_px": 224, "mpp": 0.5})
    meta = json.loads((tmp_path / "c" / "corpus.json").read_text())
    assert meta == {"build_config": {"mpp": 0.5, "patch_px": 224}, "format": "histmol-corpus",
                    "format_version": 2, "gene_reference": reference().version,
                    "histmol_version": meta["histmol_version"]}
    assert list(meta) == sorted(meta)
    genes = corpus.genes()  # a new corpus lists every reference gene, index = reference row
    assert corpus.read_table("genes").schema.equals(GENES_SCHEMA)
    assert genes["index"].tolist() == list(range(len(reference().genes)))
    assert genes["gene_id"].tolist() == reference().genes["ensembl_id"].tolist()
    assert corpus.read_table("manifest").schema.equals(MANIFEST_SCHEMA)
    assert len(corpus.manifest()) == 0
    assert len(corpus.sections()) == 0 and "panel" in corpus.sections().columns
    Corpus.open(tmp_path / "c", build_config={"patch_px": 224, "mpp": 0.5})
    with pytest.raises(CorpusError, match=r"\['patch_px'\]"):
        Corpus.open(tmp_path / "c", build_config={"patch_px": 256, "mpp": 0.5})


def test_gene_mapping_is_stable_across_sections_and_reopen(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    epcam, gfap = ref_index("ENSG00000119888"), ref_index("ENSG00000131095")
    mouse_gfap = ref_index("ENSMUSG00000020932")
    first = corpus.map_genes(gene_frame(["EPCAM", "GFAP", "nag_x3"]), "human")
    second = corpus.map_genes(gene_frame(["nag_x3", "nag_g4", "ENSG00000119888.5"]), "human")
    mouse = corpus.map_genes(gene_frame(["Gfap", "nag_x3"]), "mouse")
    assert first.dtype == np.int32
    assert first.tolist() == [epcam, gfap, key_index("nag_x3")]
    assert second.tolist() == [key_index("nag_x3"), key_index("nag_g4"), epcam]
    assert mouse.tolist() == [mouse_gfap, key_index("nag_x3", "mouse")]
    again = Corpus.open(tmp_path).map_genes(gene_frame(["nag_g4", "GFAP"]), "human")
    assert again.tolist() == [key_index("nag_g4"), gfap]
    rows = tail(Corpus.open(tmp_path))
    keys = ["unresolved:human:nag_x3", "unresolved:human:nag_g4", "unresolved:mouse:nag_x3"]
    assert rows["gene_id"].tolist() == sorted(keys, key=lambda k: tail_index(k))
    assert rows["index"].tolist() == sorted(tail_index(k) for k in keys)
    assert rows["species"].tolist() == [k.split(":")[1] for k in rows["gene_id"]]
    assert (rows["homolog_group"] == -1).all() and rows["ensembl_id"].isna().all()
    with pytest.raises(CorpusError, match="resolve to the same genes"):
        corpus.map_genes(gene_frame(["EPCAM", "ENSG00000119888"]), "human")


def test_unresolved_keys_are_an_order_free_union(tmp_path: Path) -> None:
    panels = [["nag_a1", "EPCAM", "nag_b2"], ["nag_c3", "nag_a1"], ["nag_d4"],
              ["GFAP", "nag_e5", "nag_c3"]]
    contents = set()
    for name, order in (("fwd", panels), ("rev", panels[::-1]),
                        ("mixed", [panels[2], panels[0], panels[3], panels[1]])):
        corpus = Corpus.open(tmp_path / name, create=True)
        for genes in order:
            corpus.map_genes(gene_frame(genes), "human")
        contents.add((tmp_path / name / "genes.parquet").read_bytes())
    assert len(contents) == 1
    assert tail(Corpus.open(tmp_path / "fwd"))["gene_id"].str.split(":").str[2].tolist() == \
        sorted(["nag_a1", "nag_b2", "nag_c3", "nag_d4", "nag_e5"], key=key_index)


def test_hash_collision_of_two_keys_is_refused(tmp_path: Path, monkeypatch: Any) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    corpus.map_genes(gene_frame(["nag_a1"]), "human")
    import histmol.gene_reference as reference_module

    monkeypatch.setattr(reference_module, "tail_index", lambda key: key_index("nag_a1"))
    clash = "'unresolved:human:nag_a1' and 'unresolved:human:nag_b2'"
    with pytest.raises(CorpusError, match=clash):
        corpus.map_genes(gene_frame(["nag_b2"]), "human")


def test_commit_then_reopen_shows_rows_and_readable_parts(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    build(corpus, "s2", ["nag_g1", "nag_g2"], n_pairs=3, tissue="brain", qc_score=0.5)
    build(corpus, "s1", ["nag_g2", "nag_g3"], n_pairs=1, tissue="lung", qc_passed=True)
    reopened = Corpus.open(tmp_path)
    sections = reopened.read_table("sections").to_pylist()
    assert [r["section_id"] for r in sections] == ["s1", "s2"]
    s1, s2 = sections
    assert s2["status"] == "committed" and s2["n_pairs"] == 3 and s2["n_parts"] == 2
    assert s2["panel"] == sorted([key_index("nag_g1"), key_index("nag_g2")])
    assert s2["n_genes"] == 2 and s2["tissue"] == "brain"
    assert s1["qc_passed"] is True and s2["qc_passed"] is None and s1["qc_score"] is None
    manifest = reopened.read_table("manifest").to_pylist()
    assert [(m["section_id"], m["part"]) for m in manifest] == [("s1", 0), ("s2", 0), ("s2", 1)]
    assert manifest[1]["images_path"] == "shards/s2/part-00000.zarr"
    for m in manifest:
        with ShardReader(tmp_path / m["images_path"]) as reader:
            assert reader.n_pairs == m["n_pairs"]
        units = pq.read_table(tmp_path / m["units_path"])
        assert units.num_rows == m["n_units"]
    assert reopened.section_status("s2")["status"] == "committed"  # type: ignore[index]
    assert reopened.section_status("nope") is None
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["s1", "s2"]


def test_table_bytes_do_not_depend_on_commit_order(tmp_path: Path) -> None:
    for name, order in (("a", ["s1", "s2"]), ("b", ["s2", "s1"])):
        corpus = Corpus.open(tmp_path / name, create=True, build_config={"k": 1})
        for section_id in order:
            build(corpus, section_id, ["nag_g1", "nag_g3"] if section_id == "s1" else ["nag_g2"])
    for table in ("corpus.json", "genes.parquet", "sections.parquet", "manifest.parquet"):
        assert (tmp_path / "a" / table).read_bytes() == (tmp_path / "b" / table).read_bytes()
    for section_id in ("s1", "s2"):
        for path in sorted((tmp_path / "a" / "shards" / section_id).rglob("*")):
            twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
            assert path.is_dir() or path.read_bytes() == twin.read_bytes()


def test_recommit_requires_force_and_force_replaces(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    build(corpus, "s1", ["nag_g1"], n_pairs=3)
    with pytest.raises(CorpusError, match="already committed"):
        build(corpus, "s1", ["nag_g1"], n_pairs=1)
    build(corpus, "s1", ["nag_g1"], n_pairs=1, force=True)
    assert corpus.section_status("s1")["n_pairs"] == 1  # type: ignore[index]
    assert [m["part"] for m in corpus.read_table("manifest").to_pylist()] == [0]
    assert sorted(p.name for p in (tmp_path / "shards" / "s1").iterdir()) == [
        "part-00000.parquet", "part-00000.zarr"
    ]
    corpus.close()  # the refused commit left its staging folder to the caller: now stale
    assert len(Corpus.open(tmp_path).cleanup_staging()) == 1  # the folder (and its lock)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["s1"]  # no trash


def test_record_failure_keeps_committed_data(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    assert corpus.record_failure("s9", {"platform": "xenium"}, "mpp disagreement") is True
    failed = corpus.section_status("s9")
    assert failed is not None and failed["status"] == "failed"
    assert failed["reason"] == "mpp disagreement" and failed["n_pairs"] == 0
    build(corpus, "s1", ["nag_g1"])
    before = corpus.read_table("manifest")
    assert corpus.record_failure("s1", {"platform": "visium"}, "later failure") is False
    assert corpus.section_status("s1")["status"] == "committed"  # type: ignore[index]
    assert corpus.read_table("manifest").equals(before)
    build(corpus, "s9", ["nag_g1"])  # a failed section can be committed later without force
    assert corpus.section_status("s9")["status"] == "committed"  # type: ignore[index]


def test_remove_section(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    build(corpus, "s1", ["nag_g1"])
    build(corpus, "s2", ["nag_g2"])
    (tmp_path / "qc" / "s1").mkdir(parents=True)
    (tmp_path / "qc" / "s1" / "overview.png").write_bytes(b"png")
    assert corpus.remove_section("s1") is True
    assert not (tmp_path / "qc" / "s1").exists()
    assert corpus.remove_section("s1") is False
    assert [r["section_id"] for r in corpus.read_table("sections").to_pylist()] == ["s2"]
    assert {m["section_id"] for m in corpus.read_table("manifest").to_pylist()} == {"s2"}
    assert not (tmp_path / "shards" / "s1").exists()
    assert tail(corpus)["gene_id"].tolist() == sorted(  # a removed section's keys stay
        ["unresolved:human:nag_g1", "unresolved:human:nag_g2"], key=tail_index)


def test_interrupted_commit_reads_incomplete_and_recovers(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    build(corpus, "s1", ["nag_g1"])
    build(corpus, "s2", ["nag_g1"])
    # Simulate a crash of a forced re-commit of s1 right after step 1 (its parts left the
    # manifest: the fragment of its old row without parts).
    view = section_view(local_store(tmp_path), "s1")
    commit_fragment(local_store(tmp_path), "s1", view.rows, [])  # as step 1 does
    assert corpus.section_status("s1")["status"] == "incomplete"  # type: ignore[index]
    assert corpus.section_status("s2")["status"] == "committed"  # type: ignore[index]
    build(corpus, "s1", ["nag_g1"], n_pairs=2)  # no force needed: it is not committed
    assert corpus.section_status("s1")["status"] == "committed"  # type: ignore[index]
    assert {m["section_id"] for m in corpus.read_table("manifest").to_pylist()} == {"s1", "s2"}


def test_staging_cleanup_removes_only_stale_debris(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    live = corpus.staging_dir("s1")
    (live / "part-00000.parquet").write_bytes(b"in progress")
    stale = tmp_path / "shards" / ".staging-s2.tmp-1-dead"
    stale.mkdir()
    (stale / "x").write_bytes(b"")
    (tmp_path / "shards" / ".staging-s3.tmp-1-gone.lock").write_bytes(b"")  # lock, no folder
    (tmp_path / "shards" / ".trash-s4.tmp-1-old").mkdir()
    (tmp_path / ".manifest.parquet.tmp-1-abc").write_bytes(b"torn")
    removed = Corpus.open(tmp_path).cleanup_staging()  # another Corpus object: lock is held
    assert sorted(removed) == [
        ".manifest.parquet.tmp-1-abc",
        "shards/.staging-s2.tmp-1-dead",
        "shards/.staging-s3.tmp-1-gone.lock",
        "shards/.trash-s4.tmp-1-old",
    ]
    assert live.is_dir()
    corpus.close()  # the owner goes away: its staging folder becomes stale
    assert Corpus.open(tmp_path).cleanup_staging() == [f"shards/{live.name}"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == []


def test_commit_rejects_mismatched_staging(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    indices = corpus.map_genes(gene_frame(["nag_g1"]), "human")
    staging, records = stage_section(corpus, "s1", 3, indices)
    with pytest.raises(CorpusError, match="do not match"):
        corpus.commit_section("s1", staging, records=records[:1], row={"platform": "visium"})
    with pytest.raises(CorpusError, match="not a staging folder"):
        corpus.commit_section("s1", tmp_path, records=records, row={"platform": "visium"})
    with pytest.raises(ValueError, match="status"):
        corpus.commit_section("s1", staging, records=records,
                              row={"platform": "visium", "status": "x"})
    with pytest.raises(ValueError, match="'bad'"):
        corpus.commit_section("s1", staging, records=records,
                              row={"platform": "visium", "bad": {"a": 1}})
    assert len(corpus.manifest()) == 0
    corpus.discard_staging(staging)
    assert not staging.exists()


def _commit_many(root: str, worker: int, barrier: Any) -> dict[str, list[int]]:
    corpus = Corpus.open(root)
    barrier.wait()
    mapped: dict[str, list[int]] = {}
    for k in range(5):
        section_id = f"w{worker}-s{k}"
        genes = [f"nag_g{(worker + k + j) % 7}" for j in range(4)]
        indices = corpus.map_genes(gene_frame(genes), "human")
        staging, records = stage_section(corpus, section_id, 3, indices, seed=worker * 10 + k)
        corpus.commit_section(section_id, staging, records=records,
                              row={"platform": "visium", "panel": indices})
        mapped[section_id] = [*genes, *map(str, indices.tolist())]
    return mapped


def test_concurrent_commits_from_two_processes_all_land(tmp_path: Path) -> None:
    Corpus.open(tmp_path, create=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = pool.starmap(_commit_many, [(str(tmp_path), w, barrier) for w in (1, 2)])
    corpus = Corpus.open(tmp_path)
    manifest = corpus.read_table("manifest").to_pylist()
    assert sorted({m["section_id"] for m in manifest}) == sorted(
        f"w{w}-s{k}" for w in (1, 2) for k in range(5)
    )
    assert len(manifest) == 10 * 2  # 3 pairs at 2 per shard: 2 parts per section
    assert all(r["status"] == "committed" for r in corpus.read_table("sections").to_pylist())
    genes = corpus.genes()
    assert np.all(np.diff(genes["index"].to_numpy()) > 0)
    assert not genes["gene_id"].duplicated().any()
    lookup = dict(zip(genes["gene_id"], genes["index"], strict=True))
    assert len(tail(corpus)) == 7
    for mapped in results:
        for values in mapped.values():
            ids, indices = values[:4], [int(v) for v in values[4:]]
            assert [lookup[f"unresolved:human:{g}"] for g in ids] == indices
    assert sorted(os.listdir(tmp_path / "shards")) == sorted(
        f"w{w}-s{k}" for w in (1, 2) for k in range(5)
    )


def test_section_metadata_columns_are_typed_and_checked(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    build(corpus, "s1", ["nag_g1"], qc_score=1)
    build(corpus, "s2", ["nag_g1"], qc_score=2.5, flag=np.bool_(True))
    table = corpus.read_table("sections")
    assert table.schema.field("qc_score").type == pa.float64()
    assert table.schema.field("flag").type == pa.bool_()
    assert table.column("qc_score").to_pylist() == [1.0, 2.5]
    with pytest.raises(ValueError, match="'qc_score'"):
        build(corpus, "s3", ["nag_g1"], qc_score="high")
    assert [r["section_id"] for r in corpus.read_table("sections").to_pylist()] == ["s1", "s2"]
    assert not (tmp_path / "shards" / "s3").exists()  # refused before anything moved


def test_list_valued_metadata_and_dataframe_readers(tmp_path: Path) -> None:
    corpus = Corpus.open(tmp_path, create=True)
    build(corpus, "s1", ["nag_g1"], native_to_wsi=np.eye(3).ravel(), tags=["a", "b"])
    build(corpus, "s2", ["nag_g1"], native_to_wsi=[1, 0, 0, 0, 1, 0, 0, 0, 1])
    table = corpus.read_table("sections")
    assert table.schema.field("native_to_wsi").type == pa.list_(pa.float64())
    assert table.schema.field("tags").type == pa.list_(pa.string())
    frame = corpus.sections()
    assert isinstance(frame, pd.DataFrame) and frame["section_id"].tolist() == ["s1", "s2"]
    assert frame["native_to_wsi"].iloc[1].tolist() == [1.0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert corpus.manifest()["n_pairs"].sum() == 6
    assert tail(corpus)["gene_id"].tolist() == ["unresolved:human:nag_g1"]
    empty = Corpus.open(tmp_path / "empty", create=True)
    assert list(empty.manifest().columns) == MANIFEST_SCHEMA.names
    assert len(empty.sections()) == 0 and "panel" in empty.sections().columns
