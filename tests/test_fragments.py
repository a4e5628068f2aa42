"""Per-section table fragments: a commit writes its own rows only; compaction merges them.

Issue 15: a commit that rewrote sections.parquet and manifest.parquet whole made a build of N
sections quadratic. These tests hold the fragment layout to what it promises: a commit's writes
do not grow with the corpus, readers see fragments and compacted tables as one, compaction gives
the bytes of the old whole-table rewrites (in any commit order), and damage is still detected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_corpus import build

from histmol.data import PairDataset
from histmol.errors import CorpusError
from histmol.shards import fragments
from histmol.shards.commit_record import RECORD, check_local
from histmol.shards.corpus import Corpus
from histmol.validate import validate_corpus

TABLES = ("sections.parquet", "manifest.parquet")


def _corpus(root: Path, sections: list[str], *, compact_each: bool = False) -> Corpus:
    """A corpus of small sections committed in the given order (fragments unless compacted)."""
    corpus = Corpus.open(root, create=True)
    for section_id in sections:
        i = sum(section_id.encode())  # content from the id, not the commit order
        build(corpus, section_id, ["nag_g1", f"nag_g{i + 2}"], n_pairs=1 + i % 3,
              tissue=f"t{i % 2}", qc_score=float(i))
        if compact_each:
            corpus.compact()
    return corpus


def _written(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (file name, bytes) a fragment-store write puts from here on."""
    writes: list[tuple[str, int]] = []
    real = fragments.atomic_write_bytes

    def counting(path: Path, data: bytes) -> None:
        writes.append((Path(path).name, len(data)))
        real(path, data)

    monkeypatch.setattr(fragments, "atomic_write_bytes", counting)
    return writes


def test_a_commit_writes_the_same_bytes_in_a_small_and_a_large_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes = {}
    for n in (2, 40):
        corpus = _corpus(tmp_path / str(n), [f"s{i:03d}" for i in range(n)], compact_each=True)
        tables = {name: (corpus.root / name).read_bytes() for name in TABLES}
        writes = _written(monkeypatch)
        build(corpus, "zz-new", ["nag_g1", "nag_g2"], n_pairs=2, tissue="t0", qc_score=1.0)
        monkeypatch.undo()
        assert {name: (corpus.root / name).read_bytes() for name in TABLES} == tables
        assert [name.split(".")[-2] for name, _ in writes] == ["manifest", "sections", "commit"]
        sizes[n] = sum(size for name, size in writes if name != RECORD)
        assert "zz-new" in set(corpus.read_table("sections").column("section_id").to_pylist())
    assert sizes[2] == sizes[40]  # its own two rows, whatever the corpus holds


def test_compaction_gives_the_bytes_of_whole_table_rewrites_in_any_order(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(6)]
    each = _corpus(tmp_path / "each", ids, compact_each=True)
    batch = _corpus(tmp_path / "batch", list(reversed(ids)))
    assert len(json.loads((batch.root / RECORD).read_bytes())["fragments"]) == 6
    for name in ("sections", "manifest"):  # readers see one state before the compaction
        assert batch.read_table(name).equals(each.read_table(name))
    assert batch.compact() and not batch.compact()
    for name in (*TABLES, "genes.parquet", RECORD):
        assert (batch.root / name).read_bytes() == (each.root / name).read_bytes(), name
    assert not list((batch.root / "fragments").iterdir())


def test_the_loader_and_validate_read_uncompacted_fragments(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "c", ["a", "b", "c"])
    corpus.remove_section("b")  # a tombstone, then compaction: b's rows leave the tables
    build(corpus, "d", ["nag_g1"], n_pairs=2)
    build(corpus, "a", ["nag_g1"], n_pairs=4, force=True)  # replaces a's fragment
    record = json.loads((corpus.root / RECORD).read_bytes())
    assert sorted(record["fragments"]) == ["a", "d"]
    assert len(list((corpus.root / "fragments").iterdir())) == 4  # a's old files are gone
    dataset = PairDataset(corpus.root, cache_dir=tmp_path / "cache")
    pairs: dict[str, int] = {}
    for part in dataset.parts:
        pairs[part.section_id] = pairs.get(part.section_id, 0) + part.n_pairs
    assert pairs == {"a": 4, "c": 1 + sum(b"c") % 3, "d": 2}
    tables = {"genes.parquet", *TABLES, RECORD}  # the test's parts lack the builder's columns
    assert [p for p in validate_corpus(corpus.root) if p.path in tables] == []
    sha = dataset.sources[0].manifest_sha256
    corpus.compact()
    assert PairDataset(corpus.root, cache_dir=tmp_path / "cache").sources[0].manifest_sha256 == sha


def test_a_damaged_or_missing_fragment_is_named(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "c", ["a", "b"])
    record = json.loads((corpus.root / RECORD).read_bytes())
    file = record["fragments"]["b"]["manifest"]["file"]
    data = bytearray((corpus.root / file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (corpus.root / file).write_bytes(bytes(data))
    assert list(check_local(corpus.root)) == [file]
    assert [p.path for p in validate_corpus(corpus.root)][:1] == [file]
    with pytest.raises(CorpusError, match=rf"{corpus.root / file}: .*commit\.json records"):
        PairDataset(corpus.root, cache_dir=tmp_path / "cache")
    with pytest.raises(CorpusError, match="refusing to write to a damaged corpus"):
        corpus.compact()  # a writer never blesses the bytes
    (corpus.root / file).unlink()
    assert check_local(corpus.root) == {file: "missing, but commit.json records it"}


def test_debris_of_a_killed_commit_is_removed(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "c", ["a"])
    orphan = corpus.root / "fragments" / "b.0123456789abcdef.sections.parquet"
    orphan.write_bytes(b"written before its record")
    torn = corpus.root / "fragments" / ".a.x.manifest.parquet.tmp-1-abc"
    torn.write_bytes(b"torn")
    removed = corpus.cleanup_staging()
    assert set(removed) >= {"fragments/" + orphan.name, "fragments/" + torn.name}
    assert not orphan.exists() and not torn.exists()
    assert check_local(corpus.root) == {}


def test_commits_compact_themselves_every_compact_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fragments, "COMPACT_AFTER", 3)
    monkeypatch.setattr("histmol.shards.corpus.COMPACT_AFTER", 3)
    corpus = _corpus(tmp_path / "c", ["a", "b"])
    assert len(json.loads((corpus.root / RECORD).read_bytes())["fragments"]) == 2
    build(corpus, "c", ["nag_g1"])
    assert json.loads((corpus.root / RECORD).read_bytes())["fragments"] == {}
    assert corpus.read_table("sections").column("section_id").to_pylist() == ["a", "b", "c"]


def test_a_column_type_clash_with_a_fragment_is_refused_before_anything_moves(
    tmp_path: Path,
) -> None:
    corpus = _corpus(tmp_path / "c", ["a"])  # qc_score a float, in a fragment only
    with pytest.raises(ValueError, match="'qc_score'"):
        build(corpus, "b", ["nag_g1"], qc_score="high")
    assert not (corpus.root / "shards" / "b").exists()
    rows: list[dict[str, Any]] = corpus.read_table("sections").to_pylist()
    assert [r["section_id"] for r in rows] == ["a"]


def test_the_compact_command_merges_what_a_killed_ingest_left(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histmol.cli import app

    corpus = _corpus(tmp_path / "c", ["a", "b"])
    first = CliRunner().invoke(app, ["compact", str(corpus.root)])
    assert first.exit_code == 0 and "fragments merged into the tables" in first.output
    assert json.loads((corpus.root / RECORD).read_bytes())["fragments"] == {}
    again = CliRunner().invoke(app, ["compact", str(corpus.root)])
    assert again.exit_code == 0 and "nothing to merge" in again.output
    missing = CliRunner().invoke(app, ["compact", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "not a histmol corpus" in missing.output
