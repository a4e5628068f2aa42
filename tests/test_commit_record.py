"""The commit record (commit.json) makes any change to a committed table byte detectable.

The corruptions are those the integrity review found passing unnoticed: corpus.json's
jpeg_quality 90 -> 91 and a renamed key, an ensembl_id in genes.parquet changed to another valid
id, and a QC value of sections.parquet nulled. Crashes between the three steps of a table write
must leave a corpus that readers accept and the next write settles.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from qc_corpus import QcCorpus, shared_qc_corpus
from test_corpus import build
from test_remote_ingest import endpoint, s3  # noqa: F401  (fixtures: a moto S3 server)

from histmol.data import PairDataset
from histmol.errors import CorpusError
from histmol.shards import commit_record, fragments
from histmol.shards.atomic import write_parquet
from histmol.shards.commit_record import (
    RECORD,
    CommitRecord,
    Digest,
    RecordMismatch,
    check_local,
    reseal,
    write_table,
)
from histmol.shards.corpus import Corpus
from histmol.shards.remote import RemoteCorpus
from histmol.validate import validate_corpus


@pytest.fixture(scope="session")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


def _edit_json(old: str, new: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "corpus.json"
        text = path.read_text()
        assert text.count(old) == 1
        path.write_text(text.replace(old, new))
    return edit


def _other_ensembl_id(root: Path) -> None:
    path = root / "genes.parquet"
    table = pq.read_table(path)
    ids = table.column("ensembl_id").to_pylist()
    ids[0] = ids[1]  # another valid id of the vocabulary
    at = table.column_names.index("ensembl_id")
    write_parquet(path, table.set_column(at, "ensembl_id", pa.array(ids, pa.string())))


def _null_qc_value(root: Path) -> None:
    path = root / "sections.parquet"
    table = pq.read_table(path)
    values = table.column("qc_barcode_match_rate").to_pylist()
    assert values[1] is not None
    values[1] = None
    at = table.column_names.index("qc_barcode_match_rate")
    write_parquet(path, table.set_column(at, "qc_barcode_match_rate",
                                         pa.array(values, pa.float64())))


CORRUPTIONS = {
    "corpus.json": ("jpeg_quality", _edit_json('"jpeg_quality": 90', '"jpeg_quality": 91')),
    "corpus.json ": ("key rename", _edit_json('"target_mpp"', '"tarfet_mpp"')),
    "genes.parquet": ("ensembl id", _other_ensembl_id),
    "sections.parquet": ("qc null", _null_qc_value),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_table_corruption_is_reported_and_refused(qc: QcCorpus, tmp_path: Path,
                                                  name: str) -> None:
    root = qc.copy(tmp_path / "corpus")
    _, corrupt = CORRUPTIONS[name]
    corrupt(root)
    problems = validate_corpus(root)
    assert problems, "the corruption went unnoticed"
    assert problems[0].path == name.strip()
    assert "commit.json records" in problems[0].message
    with pytest.raises(RecordMismatch, match=rf"{root / name.strip()}: .*commit\.json records"):
        PairDataset(root, cache_dir=tmp_path / "cache")
    with pytest.raises(CorpusError, match=rf"{root / name.strip()}: .*refusing to write"):
        Corpus.open(root).remove_section("crc-01")  # a writer does not bless the bytes either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = PairDataset([root, qc.root], cache_dir=tmp_path / "cache", on_corrupt="skip")
    assert [s.url for s in dataset.sources] == [str(qc.root)]
    assert dataset.parts == PairDataset(qc.root, cache_dir=tmp_path / "cache").parts
    skipped = [str(w.message) for w in caught if "skipping corpus" in str(w.message)]
    assert len(skipped) == 1 and str(root / name.strip()) in skipped[0]
    with pytest.warns(UserWarning, match="skipping corpus"), \
            pytest.raises(CorpusError, match="every corpus was skipped"):
        PairDataset(root, cache_dir=tmp_path / "cache", on_corrupt="skip")


def test_sound_corpus_record_covers_every_table(qc: QcCorpus) -> None:
    record = json.loads((qc.root / RECORD).read_bytes())
    assert record["format"] == "histmol-commit" and record["pending"] == {}
    assert sorted(record["tables"]) == sorted(commit_record.RECORDED)
    for name, entry in record["tables"].items():
        assert Digest.of((qc.root / name).read_bytes()) == Digest(entry["sha256"], entry["size"])
    assert check_local(qc.root) == {}


def test_missing_or_garbled_record_is_refused_and_reseal_accepts(qc: QcCorpus,
                                                                 tmp_path: Path) -> None:
    root = qc.copy(tmp_path / "corpus")
    (root / RECORD).unlink()
    assert [p.path for p in validate_corpus(root)] == [RECORD]
    with pytest.raises(RecordMismatch, match=rf"{root / RECORD}: missing"):
        PairDataset(root, cache_dir=tmp_path / "cache")
    (root / RECORD).write_text("{")
    assert [p.path for p in validate_corpus(root)] == [RECORD]
    reseal(root)
    assert validate_corpus(root) == []


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_a_crash_inside_a_table_write_leaves_an_accepted_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int,
) -> None:
    """Kill a compaction's four writes after 0-3 of them: readers accept, writers settle."""
    corpus = Corpus.open(tmp_path, create=True)
    build(corpus, "s1", ["g1", "g2"])
    build(corpus, "s2", ["g2", "g3"])
    before = (tmp_path / "manifest.parquet").read_bytes()
    view = {name: corpus.read_table(name) for name in ("sections", "manifest")}
    real = fragments.atomic_write_bytes
    calls = []

    def crashing(path: Path, data: bytes) -> None:
        calls.append(Path(path).name)
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")
        real(path, data)

    monkeypatch.setattr(fragments, "atomic_write_bytes", crashing)
    with pytest.raises(KeyboardInterrupt):
        corpus.compact()  # the fragments of s1 and s2 join the tables
    monkeypatch.undo()
    assert calls == [RECORD, "sections.parquet", "manifest.parquet", RECORD][:crash_at]
    after = (tmp_path / "manifest.parquet").read_bytes()
    assert (after == before) == (crash_at <= 3)
    assert check_local(tmp_path) == {}
    assert {name: corpus.read_table(name) for name in view} == view  # readers see one state
    record = json.loads((tmp_path / RECORD).read_bytes())
    assert bool(record["pending"]) == (crash_at >= 2)
    if crash_at == 4:  # a flipped byte matches neither the committed nor the pending state
        data = bytearray(after)
        data[len(data) // 2] ^= 0x01
        (tmp_path / "manifest.parquet").write_bytes(bytes(data))
        assert list(check_local(tmp_path)) == ["manifest.parquet"]
        (tmp_path / "manifest.parquet").write_bytes(after)
    assert Corpus.open(tmp_path).compact()  # the next write settles the record
    record = json.loads((tmp_path / RECORD).read_bytes())
    assert record["pending"] == {} and record["fragments"] == {}
    assert check_local(tmp_path) == {} and not list((tmp_path / "fragments").iterdir())
    assert {name: corpus.read_table(name) for name in view} == view


def test_record_states_accept_only_committed_or_pending_bytes() -> None:
    old, new, flipped = b"old table", b"new table", b"new tablf"
    record = CommitRecord({"genes.parquet": Digest.of(old)}, {})
    assert record.problem("genes.parquet", old) is None
    assert "commit.json records 9 bytes" in str(record.problem("genes.parquet", new))
    pending = record.with_pending("genes.parquet", new)
    assert pending.problem("genes.parquet", old) is None
    assert pending.problem("genes.parquet", new) is None
    assert pending.problem("genes.parquet", flipped) is not None
    promoted = pending.promoted("genes.parquet")
    assert promoted.problem("genes.parquet", old) is not None
    assert CommitRecord.from_bytes(promoted.to_bytes(), "x") == promoted
    assert promoted.problem("sections.parquet", b"x") == "not recorded in commit.json"
    assert record.problem("genes.parquet", None) == "missing, but commit.json records it"
    with pytest.raises(ValueError, match="not a recorded corpus table"):
        write_table(Path("/nonexistent/gene_stats.parquet"), b"")


def test_remote_corpus_record_is_put_last_and_checked(
    s3: dict[str, Any], tmp_path: Path,  # noqa: F811
) -> None:
    url = f"s3://bucket/{tmp_path.name}/corpus"
    local = tmp_path / "scratch"
    corpus = Corpus.open(local, create=True)
    build(corpus, "s1", ["g1", "g2"])
    build(corpus, "s2", ["g2", "g3"])
    remote = RemoteCorpus(url, local=local, storage_options=s3)
    remote.initialise()
    puts: list[str] = []
    put = remote._put
    remote._put = lambda name, data: (puts.append(name), put(name, data))[1]  # type: ignore
    remote.publish_section("s1")
    remote.publish_section("s2")
    tables = [n for n in puts if not n.startswith("shards/")]
    # a publish: the section's two fragment objects, then the record naming them (live)
    assert [n.split(".")[0] for n in tables[-3:]] == ["fragments/s2", "fragments/s2", "commit"]
    for at, name in enumerate(tables):  # a table put sits between two record puts
        if name in commit_record.RECORDED:
            assert tables[at - 1] == tables[at + 1] == RECORD
    puts.clear()
    assert remote.compact()
    assert puts == [RECORD, "sections.parquet", "manifest.parquet", RECORD]
    fs, root = fsspec.core.url_to_fs(url, **s3)
    record = CommitRecord.from_bytes(fs.cat_file(f"{root}/{RECORD}"), url)
    assert record.pending == {} and sorted(record.tables) == sorted(commit_record.RECORDED)
    assert record.fragments == {} and not fs.exists(f"{root}/fragments")
    dataset = PairDataset(url, storage_options=s3, cache_dir=tmp_path / "cache")
    assert sorted({p.section_id for p in dataset.parts}) == ["s1", "s2"]
    sections = pq.read_table(pa.BufferReader(fs.cat_file(f"{root}/sections.parquet")))
    at = sections.column_names.index("config_hash")
    sink = pa.BufferOutputStream()
    write_parquet(sink, sections.set_column(at, "config_hash",  # type: ignore[arg-type]
                                            pa.array(["c2", "c1"], pa.string())))
    fs.pipe_file(f"{root}/sections.parquet", sink.getvalue().to_pybytes())
    with pytest.raises(RecordMismatch, match=rf"{url}/sections.parquet: .*commit\.json records"):
        PairDataset(url, storage_options=s3, cache_dir=tmp_path / "cache")
    remote.pull()  # the scratch takes the remote record with the tables
    assert list(check_local(local)) == ["sections.parquet"]  # and the scratch sees it too
