"""The commit record: sha256 and size of every corpus table, so any changed byte is detected.

``commit.json`` at the corpus root covers the contract tables (`RECORDED`: ``corpus.json``,
``genes.parquet``, ``sections.parquet``, ``manifest.parquet``). ``gene_stats.parquet`` is a cache
the loader derives and checks against the manifest's sha256 itself; ``qc/`` figures are outside
the data contract; shard parts are covered by the manifest's own sha256 columns. Format::

    {"format": "histmol-commit", "format_version": 1,
     "tables":  {"<name>": {"sha256": "<hex>", "size": <bytes>}, ...},
     "pending": {"<name>": {"sha256": "<hex>", "size": <bytes>}}}

A table's bytes are accepted when they match its ``tables`` entry or its ``pending`` entry; any
other bytes are corruption. Every table write (`write_table`, under the corpus lock) is three
atomic steps: (1) rewrite the record with the new bytes' digest under ``pending``; (2) rename the
table into place; (3) rewrite the record with the pending digest promoted to ``tables``. A kill at
any instant leaves a table matching ``tables`` (before 2) or ``pending`` (after 2), so readers
never refuse a crashed corpus and the next write settles the record. A flipped bit matches
neither. Object stores (`histmol.shards.remote`) use the same three puts.

Readers take a consistent snapshot without a lock (`read_snapshot`): record, tables, record
again; a record that changed in between (a concurrent write) means read again. A corpus without
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
RECORD_VERSION = 1
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
class CommitRecord:
    """The committed and pending digests of the corpus tables (immutable; methods return copies)."""

    tables: Mapping[str, Digest] = field(default_factory=dict)
    pending: Mapping[str, Digest] = field(default_factory=dict)

    # ------------------------------------------------------------------ (de)serialisation
    def to_bytes(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no timestamps: equal records are equal bytes)."""
        return dumps_json({
            "format": RECORD_FORMAT, "format_version": RECORD_VERSION,
            "tables": {k: v.to_dict() for k, v in sorted(self.tables.items())},
            "pending": {k: v.to_dict() for k, v in sorted(self.pending.items())},
        })

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> CommitRecord:
        """Parse a record; CorpusError naming `where` when it is not one."""
        try:
            obj = json.loads(data)
            if obj.get("format") != RECORD_FORMAT or obj.get("format_version") != RECORD_VERSION:
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
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise RecordMismatch(f"{where}: not a commit record ({error})") from error
        return cls(parts[0], parts[1])

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

    def problems(self, tables: Mapping[str, bytes | None]) -> dict[str, str]:
        """{name: problem} for every recorded table in `tables` that is not accepted."""
        found = {name: self.problem(name, data) for name, data in tables.items()}
        return {name: message for name, message in found.items() if message is not None}

    # ------------------------------------------------------------------ writing
    def settled(self, current: Mapping[str, bytes | None],
                where: Callable[[str], str]) -> CommitRecord:
        """The record with every table at its `current` bytes (a crashed write's pending resolved).

        CorpusError naming the file when bytes match neither state: a writer must not bless them.
        """
        tables = {}
        for name, data in current.items():
            message = self.problem(name, data)
            if message is not None:
                raise CorpusError(
                    f"{where(name)}: {message}; refusing to write to a damaged corpus (restore "
                    f"the file, or accept its bytes with histmol.shards.commit_record.reseal)"
                )
            if data is not None:
                tables[name] = Digest.of(data)
        return CommitRecord(tables, {})

    def with_pending(self, name: str, data: bytes) -> CommitRecord:
        """Step 1 of a write: `data` becomes an accepted state of `name`."""
        return CommitRecord(dict(self.tables), {**self.pending, name: Digest.of(data)})

    def promoted(self, name: str) -> CommitRecord:
        """Step 3 of a write: the pending digest of `name` becomes its committed one."""
        pending = dict(self.pending)
        return CommitRecord({**self.tables, name: pending.pop(name)}, pending)


def parquet_bytes(table: pa.Table) -> bytes:
    """The exact bytes `histmol.shards.atomic.write_parquet` writes for `table`."""
    sink = pa.BufferOutputStream()
    write_parquet(sink, table)  # type: ignore[arg-type]  # pq.write_table takes a stream too
    return sink.getvalue().to_pybytes()


Snapshot = tuple["CommitRecord | None", dict[str, "bytes | None"]]


def read_snapshot(read: Reader, where: Callable[[str], str],
                  names: tuple[str, ...] = RECORDED) -> Snapshot:
    """(record, {name: bytes}) read consistently without a lock; record None when absent.

    Reads the record, the tables, then the record again, and repeats while a concurrent writer
    changed the record in between (at most `SNAPSHOT_TRIES` times, then the last read counts).
    """
    for attempt in range(SNAPSHOT_TRIES):
        before = read(RECORD)
        tables = {name: read(name) for name in names}
        after = read(RECORD)
        if before == after:
            break
        time.sleep(0.01 * (attempt + 1))
    record = None if after is None else CommitRecord.from_bytes(after, where(RECORD))
    return record, tables


def check_snapshot(record: CommitRecord | None,
                   tables: Mapping[str, bytes | None]) -> dict[str, str]:
    """{file name: problem} for tables the record does not accept; {} when the tables are sound."""
    if record is None:
        return {RECORD: "missing: this corpus has no commit record, so its tables cannot be "
                        "checked (written before commit records, or by a tool that bypassed "
                        "histmol; histmol.shards.commit_record.reseal records the current bytes)"}
    return record.problems(tables)


# ---------------------------------------------------------------------- local corpora
def _local_reader(root: Path) -> Reader:
    def read(name: str) -> bytes | None:
        try:
            return (root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise CorpusError(f"{root / name}: unreadable ({error})") from error
    return read


def record_write(read: Reader, write: Callable[[str, bytes], None], name: str, data: bytes,
                 where: Callable[[str], str]) -> None:
    """The three steps of a table write, over any store (`read` gives None for an absent file).

    The caller is the store's only writer (the corpus lock, or the remote corpus' single flow).
    A store without a record adopts its current bytes (a new corpus, or one from before records).
    """
    if name not in RECORDED:
        raise ValueError(f"{where(name)}: not a recorded corpus table ({list(RECORDED)})")
    tables = {table: read(table) for table in RECORDED}
    raw = read(RECORD)
    if raw is None:
        record = CommitRecord({n: Digest.of(d) for n, d in tables.items() if d is not None}, {})
    else:
        record = CommitRecord.from_bytes(raw, where(RECORD)).settled(tables, where)
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
    record_write(_local_reader(root), lambda name, b: atomic_write_bytes(root / name, b),
                 path.name, parquet_bytes(data) if isinstance(data, pa.Table) else bytes(data),
                 lambda name: str(root / name))


def reseal(root: str | os.PathLike[str]) -> None:
    """Record the current bytes of a local corpus' tables, whatever they are (hold the lock).

    For tools that rewrite tables outside `write_table` (migrations, fabricated benchmark corpora)
    and for accepting a repaired table: it blesses the bytes on disk without checking them.
    """
    root = Path(root)
    read = _local_reader(root)
    tables = {name: read(name) for name in RECORDED}
    record = CommitRecord({n: Digest.of(d) for n, d in tables.items() if d is not None}, {})
    atomic_write_bytes(root / RECORD, record.to_bytes())


def check_local(root: str | os.PathLike[str]) -> dict[str, str]:
    """{file name: problem} of a local corpus' tables against its commit record ({}: sound)."""
    root = Path(root)
    try:
        record, tables = read_snapshot(_local_reader(root), lambda name: str(root / name))
    except CorpusError as error:
        return {RECORD: str(error).removeprefix(f"{root / RECORD}: ")}
    return check_snapshot(record, tables)
