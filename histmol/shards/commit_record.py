"""The commit record: sha256 and size of every corpus table, so any changed byte is detected.

``commit.json`` at the corpus root covers the contract tables (`RECORDED`: ``corpus.json``,
``genes.parquet``, ``sections.parquet``, ``manifest.parquet``) and the per-section table fragments
committed since the last compaction (`histmol.shards.fragments`). ``gene_stats.parquet`` is a
cache the loader derives and checks against the manifest's sha256 itself; ``qc/`` figures are
outside the data contract; shard parts are covered by the manifest's own sha256 columns. Format::

    {"format": "histmol-commit", "format_version": 2,
     "tables":  {"<name>": {"sha256": "<hex>", "size": <bytes>}, ...},
     "pending": {"<name>": {"sha256": "<hex>", "size": <bytes>}},
     "fragments": {"<section_id>": {"sections": {"file": "fragments/<...>.parquet",
                                                 "sha256": "<hex>", "size": <bytes>},
                                    "manifest": {...}}}}

Version 1 records (no ``fragments``) are read as version 2 records without fragments.

A table's bytes are accepted when they match its ``tables`` entry or its ``pending`` entry; any
other bytes are corruption. Every table write (`write_table`, under the corpus lock) is three
atomic steps: (1) rewrite the record with the new bytes' digest under ``pending``; (2) rename the
table into place; (3) rewrite the record with the pending digest promoted to ``tables``. A kill at
any instant leaves a table matching ``tables`` (before 2) or ``pending`` (after 2), so readers
never refuse a crashed corpus and the next write settles the record. A flipped bit matches
neither. Object stores (`histmol.shards.remote`) use the same three puts.

A fragment file is written under a new name (its content's digest) before the record that names
it, and deleted only after a record that no longer names it: the record write is the commit point,
and a fragment's bytes must match its digest exactly.

Readers take a consistent snapshot without a lock (`read_snapshot`): record, tables and the
fragments it names, record again; a record that changed in between (a concurrent write) means
read again. A corpus without
``commit.json`` (written before commit records, or by a tool that wrote tables directly) is
refused by readers; `reseal` records its current bytes. Writers adopt the current bytes of such a
corpus on their first write.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from histmol.errors import CorpusError
from histmol.shards.atomic import atomic_write_bytes, dumps_json, write_parquet

RECORD = "commit.json"
RECORD_FORMAT = "histmol-commit"
RECORD_VERSION = 2
READ_VERSIONS = (1, 2)  # 1: before fragments
FRAGMENT_TABLES = ("manifest", "sections")  # a fragment holds rows of these two tables
RECORDED = ("corpus.json", "genes.parquet", "sections.parquet", "manifest.parquet")
SNAPSHOT_TRIES = 20


class RecordMismatch(CorpusError):
    """A corpus table that its commit record does not accept (or no record at all)."""


Reader = Callable[[str], "bytes | None"]  # relative name -> bytes, None when absent


@dataclass(frozen=True)
class Digest:
    """A table's size and sha256."""

    sha256: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The digest of `data`."""
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class FileRef:
    """A fragment file (path relative to the corpus root) and the digest of its bytes."""

    file: str
    digest: Digest

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"file": self.file, **self.digest.to_dict()}


SectionFragment = Mapping[str, FileRef]  # FRAGMENT_TABLES name -> its fragment file


@dataclass(frozen=True)
class CommitRecord:
    """The committed and pending digests of the corpus tables and the fragments (immutable).

    `fragments` maps a section id to its fragment files: the section's rows of sections.parquet
    and manifest.parquet replace whatever the compacted tables hold for it (no rows: removed).
    """

    tables: Mapping[str, Digest] = field(default_factory=dict)
    pending: Mapping[str, Digest] = field(default_factory=dict)
    fragments: Mapping[str, SectionFragment] = field(default_factory=dict)

    # ------------------------------------------------------------------ (de)serialisation
    def to_bytes(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no timestamps: equal records are equal bytes)."""
        return dumps_json({
            "format": RECORD_FORMAT, "format_version": RECORD_VERSION,
            "tables": {k: v.to_dict() for k, v in sorted(self.tables.items())},
            "pending": {k: v.to_dict() for k, v in sorted(self.pending.items())},
            "fragments": {sid: {t: ref.to_dict() for t, ref in sorted(frag.items())}
                          for sid, frag in sorted(self.fragments.items())},
        })

    def fragment_files(self) -> dict[str, Digest]:
        """{file: digest} of every fragment file the record names."""
        return {ref.file: ref.digest for frag in self.fragments.values() for ref in frag.values()}

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> CommitRecord:
        """Parse a record; CorpusError naming `where` when it is not one."""
        try:
            obj = json.loads(data)
            if obj.get("format") != RECORD_FORMAT or obj.get("format_version") not in READ_VERSIONS:
                raise ValueError(f"format {obj.get('format')!r} version "
                                 f"{obj.get('format_version')!r}, expected {RECORD_FORMAT!r} "
                                 f"{RECORD_VERSION}")
            parts = []
            for key in ("tables", "pending"):
                entries = obj[key]
                if not isinstance(entries, dict) or set(entries) - set(RECORDED):
                    raise ValueError(f"{key!r} must map table names in {list(RECORDED)}")
                parts.append({name: Digest(str(d["sha256"]), int(d["size"]))
                              for name, d in entries.items()})
            fragments = {}
            for section_id, entry in (obj.get("fragments") or {}).items():
                if not isinstance(entry, dict) or set(entry) != set(FRAGMENT_TABLES):
                    raise ValueError(f"fragment of {section_id!r} must name {FRAGMENT_TABLES}")
                fragments[str(section_id)] = {
                    table: FileRef(_fragment_file(ref["file"]),
                                   Digest(str(ref["sha256"]), int(ref["size"])))
                    for table, ref in entry.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise RecordMismatch(f"{where}: not a commit record ({error})") from error
        return cls(parts[0], parts[1], fragments)

    # ------------------------------------------------------------------ checking
    def problem(self, name: str, data: bytes | None) -> str | None:
        """Why `data` is not an accepted state of table `name`; None when it is."""
        expected = [d for d in (self.tables.get(name), self.pending.get(name)) if d is not None]
        if data is None:
            return f"missing, but {RECORD} records it" if expected else None
        got = Digest.of(data)
        if got in expected:
            return None
        if not expected:
            return f"not recorded in {RECORD}"
        want = " or ".join(f"{d.size} bytes sha256 {d.sha256[:16]}..." for d in expected)
        return (f"{got.size} bytes sha256 {got.sha256[:16]}... but {RECORD} records {want}: "
                "the file changed after its commit (corruption or an edit outside histmol)")

    def problems(self, tables: Mapping[str, bytes | None],
                 fragments: Mapping[str, bytes | None] | None = None) -> dict[str, str]:
        """{name: problem} for every recorded table or fragment file that is not accepted.

        `fragments` maps the record's fragment files to their bytes (None: absent); None checks
        tables only.
        """
        found = {name: self.problem(name, data) for name, data in tables.items()}
        if fragments is not None:
            for file, digest in self.fragment_files().items():
                found[file] = _fragment_problem(digest, fragments.get(file))
        return {name: message for name, message in found.items() if message is not None}

    # ------------------------------------------------------------------ writing
    def settled(self, current: Mapping[str, bytes | None],
                where: Callable[[str], str]) -> CommitRecord:
        """The record with the `current` tables at their bytes (a crashed write's pending resolved).

        `current` holds the tables about to be written and every table with a pending digest;
        the others keep their entries. CorpusError naming the file when bytes match neither
        state: a writer must not bless them.
        """
        tables, pending = dict(self.tables), dict(self.pending)
        for name, data in current.items():
            message = self.problem(name, data)
            if message is not None:
                raise CorpusError(
                    f"{where(name)}: {message}; refusing to write to a damaged corpus (restore "
                    f"the file, or accept its bytes with histmol.shards.commit_record.reseal)"
                )
            pending.pop(name, None)
            tables.pop(name, None)
            if data is not None:
                tables[name] = Digest.of(data)
        return CommitRecord(tables, pending, self.fragments)

    def with_pending(self, name: str, data: bytes) -> CommitRecord:
        """Step 1 of a write: `data` becomes an accepted state of `name`."""
        return CommitRecord(dict(self.tables), {**self.pending, name: Digest.of(data)},
                            self.fragments)

    def promoted(self, name: str) -> CommitRecord:
        """Step 3 of a write: the pending digest of `name` becomes its committed one."""
        pending = dict(self.pending)
        return CommitRecord({**self.tables, name: pending.pop(name)}, pending, self.fragments)

    def with_fragments(self, fragments: Mapping[str, SectionFragment]) -> CommitRecord:
        """The record naming `fragments` instead of its own."""
        return CommitRecord(dict(self.tables), dict(self.pending), dict(fragments))


FRAGMENTS_DIR = "fragments"


def _fragment_file(name: object) -> str:
    """A fragment path from a record: ``fragments/<file>``, nothing that leaves the corpus."""
    text = str(name)
    base = text.removeprefix(f"{FRAGMENTS_DIR}/")
    if base == text or not base or "/" in base or "\\" in base or base.startswith("."):
        raise ValueError(f"fragment file {text!r} is not a file under {FRAGMENTS_DIR}/")
    return text


def _fragment_problem(digest: Digest, data: bytes | None) -> str | None:
    if data is None:
        return f"missing, but {RECORD} records it"
    got = Digest.of(data)
    if got == digest:
        return None
    return (f"{got.size} bytes sha256 {got.sha256[:16]}... but {RECORD} records {digest.size} "
            f"bytes sha256 {digest.sha256[:16]}...: the file changed after its commit")


def parquet_bytes(table: pa.Table) -> bytes:
    """The exact bytes `histmol.shards.atomic.write_parquet` writes for `table`."""
    sink = pa.BufferOutputStream()
    write_parquet(sink, table)  # type: ignore[arg-type]  # pq.write_table takes a stream too
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of a corpus: its record, tables and fragments.

    `record` is None when the record is absent or unreadable (`record_error` then says why);
    `fragments` maps each fragment file the record names to its bytes (None: absent).
    """

    record: CommitRecord | None
    tables: dict[str, bytes | None]
    fragments: dict[str, bytes | None]
    record_error: str | None = None

    def problems(self) -> dict[str, str]:
        """{file name: problem} for what the record does not accept; {} when all is sound."""
        if self.record_error is not None:
            return {RECORD: self.record_error}
        if self.record is None:
            return {RECORD: "missing: this corpus has no commit record, so its tables cannot be "
                            "checked (written before commit records, or by a tool that bypassed "
                            "histmol; histmol.shards.commit_record.reseal records the current "
                            "bytes)"}
        return self.record.problems(self.tables, self.fragments)


def read_snapshot(read: Reader, where: Callable[[str], str],
                  names: tuple[str, ...] = RECORDED) -> Snapshot:
    """The record, the tables `names` and the record's fragments, read consistently without a lock.

    Reads the record, the tables and fragments, then the record again, and repeats while a
    concurrent writer changed the record in between (at most `SNAPSHOT_TRIES` times, then the
    last read counts: a fragment a compaction deleted then reads as missing). An unreadable
    record names no fragments; `Snapshot.problems` reports it.
    """
    for attempt in range(SNAPSHOT_TRIES):
        before = read(RECORD)
        record, error = None, None
        if before is not None:
            try:
                record = CommitRecord.from_bytes(before, where(RECORD))
            except RecordMismatch as mismatch:
                error = str(mismatch).removeprefix(f"{where(RECORD)}: ")
        tables = {name: read(name) for name in names}
        fragments = {file: read(file) for file in (record.fragment_files() if record else {})}
        after = read(RECORD)
        if before == after:
            break
        time.sleep(0.01 * (attempt + 1))
    return Snapshot(record, tables, fragments, error)


# ---------------------------------------------------------------------- local corpora
def local_reader(root: Path) -> Reader:
    """Reader of the files of a local corpus `root` (None for an absent file)."""

    def read(name: str) -> bytes | None:
        try:
            return (root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise CorpusError(f"{root / name}: unreadable ({error})") from error
    return read


def settled_record(read: Reader, where: Callable[[str], str],
                   names: tuple[str, ...] = ()) -> CommitRecord:
    """The store's record with tables `names` and every pending table checked and settled.

    Only those tables are read (a write costs the size of what it changes, not of the corpus).
    A store without a record adopts the current bytes of every table (a new corpus, or one from
    before records). CorpusError naming the file when a checked table is damaged.
    """
    raw = read(RECORD)
    if raw is None:
        tables = {table: read(table) for table in RECORDED}
        return CommitRecord({n: Digest.of(d) for n, d in tables.items() if d is not None}, {})
    record = CommitRecord.from_bytes(raw, where(RECORD))
    checked = dict.fromkeys([*names, *record.pending])
    return record.settled({table: read(table) for table in checked}, where)


def record_write(read: Reader, write: Callable[[str, bytes], None], name: str, data: bytes,
                 where: Callable[[str], str]) -> None:
    """The three steps of a table write, over any store (`read` gives None for an absent file).

    The caller is the store's only writer (the corpus lock, or the remote corpus' single flow).
    A store without a record adopts its current bytes (a new corpus, or one from before records).
    """
    if name not in RECORDED:
        raise ValueError(f"{where(name)}: not a recorded corpus table ({list(RECORDED)})")
    record = settled_record(read, where, (name,))
    record = record.with_pending(name, data)
    write(RECORD, record.to_bytes())
    write(name, data)
    write(RECORD, record.promoted(name).to_bytes())


def write_table(path: str | os.PathLike[str], data: bytes | pa.Table) -> None:
    """Atomically write corpus table `path` (bytes, or a pyarrow Table as parquet) and record it.

    The three steps of the module docstring (`record_write`); the caller holds the corpus lock.
    A drop-in for ``atomic_write_parquet``/``atomic_write_bytes`` on the tables in `RECORDED`.
    """
    path = Path(path)
    root = path.parent
    record_write(local_reader(root), lambda name, b: atomic_write_bytes(root / name, b),
                 path.name, parquet_bytes(data) if isinstance(data, pa.Table) else bytes(data),
                 lambda name: str(root / name))


def reseal(root: str | os.PathLike[str]) -> None:
    """Record the current bytes of a local corpus' tables, whatever they are (hold the lock).

    For tools that rewrite tables outside `write_table` (migrations, fabricated benchmark corpora)
    and for accepting a repaired table: it blesses the bytes on disk without checking them.
    """
    root = Path(root)
    read = local_reader(root)
    tables = {name: read(name) for name in RECORDED}
    raw = read(RECORD)
    fragments: dict[str, SectionFragment] = {}
    try:
        old = None if raw is None else CommitRecord.from_bytes(raw, str(root / RECORD))
    except RecordMismatch:  # an unreadable record names no fragments
        old = None
    if old is not None:  # fragments keep their place, at their current bytes where present
        for section_id, fragment in old.fragments.items():
            current = {table: read(ref.file) for table, ref in fragment.items()}
            if all(data is not None for data in current.values()):
                fragments[section_id] = {table: FileRef(fragment[table].file, Digest.of(data))
                                         for table, data in current.items() if data is not None}
    record = CommitRecord({n: Digest.of(d) for n, d in tables.items() if d is not None}, {},
                          fragments)
    atomic_write_bytes(root / RECORD, record.to_bytes())


def check_local(root: str | os.PathLike[str]) -> dict[str, str]:
    """{file name: problem} of a local corpus' tables against its commit record ({}: sound)."""
    root = Path(root)
    try:
        snapshot = read_snapshot(local_reader(root), lambda name: str(root / name))
    except CorpusError as error:  # an unreadable table file
        return {RECORD: str(error).removeprefix(f"{root / RECORD}: ")}
    return snapshot.problems()
