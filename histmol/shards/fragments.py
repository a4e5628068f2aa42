"""Per-section table fragments: a commit writes its own rows, and compaction merges them later.

Rewriting ``sections.parquet`` and ``manifest.parquet`` whole on every commit made a build of N
sections cost O(N^2) in table bytes, serialised under the corpus lock (docs/scale.md). As table
formats such as Delta Lake and Apache Iceberg do, a commit instead writes the section's rows to
two small files under ``fragments/`` (named by their content's digest, so never overwritten with
other bytes) and then names them in ``commit.json`` (`histmol.shards.commit_record`): that one
record write is the commit point. A section's fragment REPLACES every row the compacted tables
hold for it (no rows: the section is gone), so readers see::

    sections = compacted rows of sections without a fragment + the fragments' rows

sorted exactly as a whole-table rewrite sorts them (`histmol.shards.corpus_tables`).
`compact` merges the fragments into the two tables (the bytes a whole-table rewrite gives) with
the record's pending protocol, then drops them from the record and deletes their files. A crash
at any instant leaves a corpus whose merged view is the old or the new one, never a mix: while
a compaction runs, the compacted tables already hold what the fragments say, and the fragments
still override them with the same rows.

Everything here works over a `TableStore` (a local folder, or an object store where each put is
atomic), so local and remote corpora commit the same way. Callers hold the store's single-writer
guarantee (the corpus flock, or the remote corpus' one publishing process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from histmol.errors import CorpusError
from histmol.shards.atomic import atomic_write_bytes
from histmol.shards.commit_record import (
    FRAGMENT_TABLES,
    FRAGMENTS_DIR,
    RECORD,
    CommitRecord,
    Digest,
    FileRef,
    Reader,
    RecordMismatch,
    Snapshot,
    local_reader,
    parquet_bytes,
    read_snapshot,
    settled_record,
)
from histmol.shards.corpus_tables import (
    MANIFEST,
    MANIFEST_SCHEMA,
    SECTION_CORE_SCHEMA,
    SECTIONS,
    manifest_table,
    parse_schema,
    parse_table,
    section_rows,
    sections_table,
)

TABLE_FILES = {"sections": SECTIONS, "manifest": MANIFEST}
SCHEMAS = {"sections": SECTION_CORE_SCHEMA, "manifest": MANIFEST_SCHEMA}
COMPACT_AFTER = 128  # fragments a commit leaves before it compacts (amortised O(N / 128))


@dataclass(frozen=True)
class TableStore:
    """Whole-file access to one corpus root: atomic writes, deletes, the fragment folder's names."""

    read: Reader
    write: Callable[[str, bytes], None]
    delete: Callable[[str], None]
    fragment_names: Callable[[], list[str]]  # every name under fragments/ (temporary ones too)
    where: Callable[[str], str]


def local_store(root: Path) -> TableStore:
    """The store of a local corpus folder (atomic rename writes)."""

    def write(name: str, data: bytes) -> None:
        path = root / name
        if path.parent != root:
            path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, data)

    def fragment_names() -> list[str]:
        folder = root / FRAGMENTS_DIR
        if not folder.is_dir():
            return []
        return sorted(f"{FRAGMENTS_DIR}/{p.name}" for p in folder.iterdir())

    return TableStore(local_reader(root), write, lambda name: (root / name).unlink(missing_ok=True),
                      fragment_names, lambda name: str(root / name))


# ---------------------------------------------------------------------- reading
def fragment_tables(snapshot: Snapshot, where: Callable[[str], str]
                    ) -> dict[str, dict[str, pa.Table]]:
    """{section_id: {"sections": rows, "manifest": rows}} of the snapshot's fragments."""
    record = snapshot.record
    if record is None:
        return {}
    out: dict[str, dict[str, pa.Table]] = {}
    for section_id, fragment in record.fragments.items():
        out[section_id] = {}
        for table, ref in fragment.items():
            data = snapshot.fragments.get(ref.file)
            if data is None:
                raise CorpusError(f"{where(ref.file)}: missing, but {RECORD} records it")
            out[section_id][table] = parse_table(data, SCHEMAS[table], where(ref.file))
    return out


def merged(base: pa.Table, table: str, fragments: Mapping[str, Mapping[str, pa.Table]]
           ) -> pa.Table:
    """`base` with each fragment's section rows replacing the base's rows of that section.

    Built through the same row functions as a whole-table rewrite, so a compaction writes the
    bytes the old protocol wrote.
    """
    if not fragments:
        return base
    if table == "sections":
        kept = [r for r in section_rows(base) if r["section_id"] not in fragments]
        added = [r for f in fragments.values() for r in section_rows(f["sections"])]
        return sections_table(kept + added)
    kept = [r for r in base.to_pylist() if r["section_id"] not in fragments]
    added = [r for f in fragments.values() for r in f["manifest"].to_pylist()]
    return manifest_table(kept + added)


def merged_tables(snapshot: Snapshot, where: Callable[[str], str]) -> dict[str, pa.Table]:
    """{"sections": table, "manifest": table} as readers see them: compacted plus fragments."""
    fragments = fragment_tables(snapshot, where)
    return {table: merged(parse_table(snapshot.tables.get(name), SCHEMAS[table], where(name)),
                          table, fragments)
            for table, name in TABLE_FILES.items()}


@dataclass(frozen=True)
class SectionView:
    """One section as readers see it, and the column types its new row must agree with.

    `schemas`: those of the compacted sections table and of every sections fragment.
    """

    rows: list[dict[str, Any]]
    manifest: list[dict[str, Any]]
    schemas: list[pa.Schema]


def section_view(store: TableStore, section_id: str) -> SectionView:
    """The section's rows (its fragment, else a filtered read of the compacted tables).

    One read of the record and of each table: what a commit needs, without decoding the whole
    corpus' rows. Call holding the store's writer.
    """
    raw = store.read(RECORD)
    record = CommitRecord() if raw is None else CommitRecord.from_bytes(raw, store.where(RECORD))
    base = {table: store.read(name) for table, name in TABLE_FILES.items()}
    fragment = record.fragments.get(section_id)
    found = {}
    for table, name in TABLE_FILES.items():
        if fragment is None:
            found[table] = parse_table(base[table], SCHEMAS[table], store.where(name), section_id)
        else:
            ref = fragment[table]
            found[table] = parse_table(store.read(ref.file), SCHEMAS[table],
                                       store.where(ref.file))
    schemas = [] if base["sections"] is None else [
        parse_schema(base["sections"], store.where(SECTIONS))]
    for other in record.fragments.values():
        ref = other["sections"]
        data = store.read(ref.file)
        if data is not None:
            schemas.append(parse_schema(data, store.where(ref.file)))
    return SectionView(section_rows(found["sections"]), found["manifest"].to_pylist(), schemas)


# ---------------------------------------------------------------------- writing
def fragment_file(section_id: str, table: str, data: bytes) -> FileRef:
    """Where a fragment's bytes go: ``fragments/<section_id>.<sha256[:16]>.<table>.parquet``."""
    digest = Digest.of(data)
    return FileRef(f"{FRAGMENTS_DIR}/{section_id}.{digest.sha256[:16]}.{table}.parquet", digest)


def commit_fragment(store: TableStore, section_id: str,
                    sections: Sequence[Mapping[str, Any]],
                    manifest: Sequence[Mapping[str, Any]]) -> CommitRecord:
    """Make `sections`/`manifest` (this section's rows; none: removed) what readers see of it.

    The fragment files are written first under their digest names; the record write that names
    them is the commit point; the section's previous fragment files are deleted after it.
    Builds both tables before writing anything, so a bad value fails with nothing changed.
    """
    payload = {"sections": parquet_bytes(sections_table(list(sections))),
               "manifest": parquet_bytes(manifest_table(list(manifest)))}
    refs = {table: fragment_file(section_id, table, data) for table, data in payload.items()}
    record = settled_record(store.read, store.where)
    for table in FRAGMENT_TABLES:
        store.write(refs[table].file, payload[table])
    before = record.fragments.get(section_id, {})
    record = record.with_fragments({**record.fragments, section_id: refs})
    store.write(RECORD, record.to_bytes())
    for table, ref in before.items():
        if ref.file != refs[table].file:
            store.delete(ref.file)
    return record


def check_writable(store: TableStore) -> Snapshot:
    """A snapshot of the store whose record accepts every table and fragment.

    RecordMismatch naming each damaged file otherwise: a writer must not build on bytes the
    record does not accept (it would bless them).
    """
    snapshot = read_snapshot(store.read, store.where)
    problems = snapshot.problems()
    if problems:
        raise RecordMismatch("; ".join(
            f"{store.where(name)}: {message}; refusing to write to a damaged corpus (restore the "
            "file, or accept its bytes with histmol.shards.commit_record.reseal)"
            for name, message in problems.items()))
    return snapshot


def compact(store: TableStore) -> bool:
    """Merge every fragment into the compacted tables; False when there was nothing to merge.

    The tables are checked against the record first (a damaged corpus is a CorpusError naming
    the file, never blessed); fragment files no record names (a crash between writing them and
    the record) are deleted too.
    """
    raw = store.read(RECORD)
    if raw is not None and not CommitRecord.from_bytes(raw, store.where(RECORD)).fragments:
        remove_orphans(store)  # nothing to merge: no table is read
        return False
    snapshot = check_writable(store)
    record = snapshot.record
    assert record is not None  # check_writable refuses a corpus without one
    if record.fragments:
        tables = merged_tables(snapshot, store.where)
        payload = {TABLE_FILES[t]: parquet_bytes(tables[t]) for t in ("sections", "manifest")}
        record = record.settled({name: snapshot.tables[name]
                                 for name in {*payload, *record.pending}}, store.where)
        for name, data in payload.items():
            record = record.with_pending(name, data)
        store.write(RECORD, record.to_bytes())
        for name in (SECTIONS, MANIFEST):  # the merged view is unchanged between these puts
            store.write(name, payload[name])
        for name in (SECTIONS, MANIFEST):
            record = record.promoted(name)
        record = record.with_fragments({})
        store.write(RECORD, record.to_bytes())
    remove_orphans(store, record)
    return bool(snapshot.record and snapshot.record.fragments)


def remove_orphans(store: TableStore, record: CommitRecord | None = None) -> list[str]:
    """Delete files under fragments/ the record does not name (a crashed commit's); their names.

    Only the store's writer may call it: a commit writes its files before the record names them.
    """
    if record is None:
        raw = store.read(RECORD)
        if raw is None:
            return []
        record = CommitRecord.from_bytes(raw, store.where(RECORD))
    orphans = sorted(set(store.fragment_names()) - set(record.fragment_files()))
    for name in orphans:
        store.delete(name)
    return orphans

