"""The corpus on disk: vocabulary, section table, manifest, and crash-safe section commits.

Layout (DESIGN.md "Corpus layout")::

    corpus.json        {"format": "histmol-corpus", "format_version": 2, "histmol_version",
                        "gene_reference", "build_config"}; sorted keys, no timestamps
    genes.parquet      index int32 (stable: the reference row, or 2**30 + hash for an
                       unresolved key), gene_id, symbol, ensembl_id, species, kind,
                       homolog_group; sorted by index
    sections.parquet   one row per section (committed or failed), sorted by section_id
    manifest.parquet   one row per committed part, sorted by (section_id, part)
    shards/<section_id>/part-NNNNN.{zarr,parquet}
    fragments/<section_id>.<sha256[:16]>.{sections,manifest}.parquet
                       rows of sections committed since the last compaction (see below)
    commit.json        sha256 and size of the four tables above and of every fragment,
                       rewritten around every write so any later change is detected
                       (``histmol.shards.commit_record``)

The loader reads only ``manifest.parquet`` rows (and the files they name), ``genes.parquet`` and
``sections.parquet``; it never lists folders. Every table is rewritten atomically (temporary
sibling, fsync, rename). All mutations run under an exclusive ``fcntl.flock`` on ``.lock`` at the
root, so commits from several processes (Dask workers, parallel builds) serialise; flock needs a
local file system or one that honours it (not every NFS setup does). ``genes()``, ``sections()``
and ``manifest()`` return pandas DataFrames; ``read_table(name)`` returns the pyarrow Table. Each
read takes one snapshot of the file's bytes, so it never mixes two versions of a table.

Vocabulary (``histmol.gene_reference``). A gene's index is a pure function of the gene: its row
in the shipped reference, or ``2**30 + hash`` of its ``unresolved:<species>:<name>`` key.
genes.parquet holds every reference gene plus the unresolved keys sections used; ``map_genes``
adds a section's unresolved keys to it under the lock, BEFORE any shard that uses them is
written. Adding is a set union (rows sorted by index), so any order of calls, from any number of
processes, gives the same bytes; removal of a section keeps its keys. A corpus made with another
format or gene reference is refused with the `histmol migrate` command to run.

Tables and fragments (``histmol.shards.fragments``). A commit writes only the section's own rows,
as two small fragment files under ``fragments/`` named in ``commit.json``; readers see the
compacted ``sections.parquet`` / ``manifest.parquet`` with each fragment's section replaced by
its rows, so a commit costs the same in a corpus of 10 or 10,000 sections. ``compact`` merges
the fragments into the two tables (the bytes a whole-table rewrite gives); a commit compacts
itself once ``COMPACT_AFTER`` fragments are waiting, and every command that ends a build
(`histmol build`, an ingest, `histmol.build.build_section`) compacts at its end, so a finished
corpus has no fragments and the same bytes whatever wrote it.

Commit protocol (``commit_section``, under the lock):

1. If the section has parts live (a forced re-commit), commit its fragment without them. From
   here the loader no longer reads the old data.
2. If ``shards/<id>`` exists (old data, or debris of a crashed commit), rename it to
   ``shards/.trash-<id>.tmp-<token>``.
3. Rename the staging folder ``shards/.staging-<id>.tmp-<token>`` to ``shards/<id>``.
4. Commit the section's fragment: its new row (``status == "committed"``, ``n_parts``) and its
   manifest rows, in one record write: now the section is live.
5. Delete the trash folder.

A crash at any point leaves a readable corpus: the manifest only ever names complete files
(parts are complete before step 3, old parts leave it in step 1 before they move in step 2, new
parts enter it in step 4 after they moved in step 3). The loader sees the old section (crash
before 1), no section (between 1 and 4) or the new section (after 4). ``section_status`` reports
a section as ``committed`` only when its row says so AND the manifest holds exactly ``n_parts``
rows for it AND its folder exists; otherwise ``incomplete``, which the builder treats like "not
built" (a crash between 1 and 4 leaves the old row without parts). A re-run then rebuilds the
section and commits it without ``force``; debris (staging and trash folders, temporary files,
fragment files no record names) is removed by ``cleanup_staging``. ``remove_section`` commits
an empty fragment first, then deletes the folder and compacts (the section's rows leave the
tables too).

Failures (``record_failure``): a section that is committed keeps its committed data and row; the
failure is the builder's to report (the corpus keeps the last good state). Otherwise a
``failed`` row is committed and any unreferenced folder of that section is deleted; shards of
other sections are never touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

import histmol
from histmol.errors import CorpusError
from histmol.gene_reference import reference, resolve_features
from histmol.section import validate_section_id
from histmol.shards.atomic import dumps_json, fsync_dir, remove_path
from histmol.shards.commit_record import local_reader, read_snapshot, write_table
from histmol.shards.corpus_tables import (
    CORPUS_JSON,
    GENES,
    GENES_SCHEMA,
    MANIFEST,
    MANIFEST_SCHEMA,
    SECTION_CORE_SCHEMA,
    SECTIONS,
    add_unresolved,
    check_row_types,
    parse_table,
    reference_vocabulary,
    section_row,
)
from histmol.shards.fragments import (
    COMPACT_AFTER,
    check_writable,
    commit_fragment,
    compact,
    local_store,
    merged_tables,
    remove_orphans,
    section_view,
)
from histmol.shards.shard_writer import ShardRecord, part_stem
from histmol.shards.staging import (
    STAGING_PREFIX,
    CorpusLock,
    clean_debris,
    create_staging,
    move_to_trash,
    release_staging,
)

FORMAT = "histmol-corpus"
FORMAT_VERSION = 2  # 2: stable gene indices from the gene reference (1: build-order indices)
SHARDS = "shards"
QC_FIGURES = "qc"  # qc/<section_id>/*.png, written after each flow build
LOCK = ".lock"
COMMITTED, FAILED, INCOMPLETE = "committed", "failed", "incomplete"
TableName = Literal["genes", "sections", "manifest"]
_TABLES: dict[str, tuple[str, pa.Schema]] = {
    "genes": (GENES, GENES_SCHEMA),
    "sections": (SECTIONS, SECTION_CORE_SCHEMA),
    "manifest": (MANIFEST, MANIFEST_SCHEMA),
}


def _canonical(obj: Any) -> Any:
    """JSON-normalised copy (tuples -> lists, sorted keys) for comparing configs."""
    return json.loads(json.dumps(obj, sort_keys=True))


def corpus_meta(build_config: Mapping[str, Any]) -> dict[str, Any]:
    """corpus.json of a corpus made by this histmol."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gene_reference": reference().version,
        "histmol_version": histmol.__version__,
        "build_config": _canonical(dict(build_config)),
    }


def check_format(meta: Mapping[str, Any], where: str, root: str) -> None:
    """CorpusError naming `where` unless `meta` is this format, version and gene reference.

    A corpus of format 1 or of another gene reference names ``histmol migrate`` (which
    rewrites its tables and units to this one).
    """
    if meta.get("format") != FORMAT:
        raise CorpusError(f"{where}: format {meta.get('format')!r}; this histmol reads {FORMAT!r}")
    version, genes = meta.get("format_version"), meta.get("gene_reference")
    if version == FORMAT_VERSION and genes == reference().version:
        return
    if version in (1, FORMAT_VERSION):
        found = "gene indices in build order" if version == 1 else f"gene reference {genes!r}"
        raise CorpusError(f"{where}: corpus written with {found}; this histmol uses "
                          f"{reference().version!r}. Run `histmol migrate {root}` to rewrite it")
    raise CorpusError(f"{where}: format version {version!r}; this histmol reads "
                      f"{FORMAT!r} {FORMAT_VERSION}")


class Corpus:
    """A corpus root folder. Use `Corpus.open`; mutating methods take the corpus lock."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta
        self.shards_dir = root / SHARDS
        self._lock = CorpusLock(root / LOCK)
        self._store = local_store(root)
        self._staging_locks: dict[Path, int] = {}

    # ------------------------------------------------------------------ opening and locking
    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        create: bool = False,
        build_config: Mapping[str, Any] | None = None,
    ) -> Corpus:
        """Open the corpus at `root`; with ``create=True`` make it if absent.

        With `build_config`, a corpus made with a different build config is a CorpusError
        naming the differing keys (a corpus is built with one config).
        """
        root = Path(root)
        meta_path = root / CORPUS_JSON
        if not meta_path.exists():
            if not create:
                raise CorpusError(f"{root}: not a histmol corpus (no {CORPUS_JSON})")
            root.mkdir(parents=True, exist_ok=True)
            with cls(root, {}).lock():
                if not meta_path.exists():
                    cls._initialise(root, build_config or {})
        try:
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError) as error:
            raise CorpusError(f"{meta_path}: unreadable ({error})") from error
        check_format(meta, str(meta_path), str(root))
        if build_config is not None:
            ours, theirs = _canonical(dict(build_config)), meta.get("build_config") or {}
            differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if differing:
                raise CorpusError(
                    f"{meta_path}: corpus was built with another build config "
                    f"(differing keys: {differing})"
                )
        return cls(root, meta)  # opening never writes: readers may use read-only media

    @staticmethod
    def _initialise(root: Path, build_config: Mapping[str, Any]) -> None:
        (root / SHARDS).mkdir(exist_ok=True)
        if not (root / GENES).exists():
            write_table(root / GENES, reference_vocabulary())
        for name, schema in ((SECTIONS, SECTION_CORE_SCHEMA), (MANIFEST, MANIFEST_SCHEMA)):
            if not (root / name).exists():
                write_table(root / name, schema.empty_table())
        write_table(root / CORPUS_JSON, dumps_json(corpus_meta(build_config)))  # last: "a corpus"

    @property
    def build_config(self) -> dict[str, Any]:
        """The build config recorded in corpus.json."""
        return dict(self.meta.get("build_config") or {})

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the corpus' exclusive inter-process lock (re-entrant within this object)."""
        with self._lock.hold():
            yield

    # ------------------------------------------------------------------ readers
    def read_table(self, name: TableName) -> pa.Table:
        """``genes``, ``sections`` or ``manifest`` as a pyarrow Table (empty, typed, if absent).

        Sections and manifest come from one snapshot of the compacted table and the fragments
        committed since (``histmol.shards.fragments``): what the loader reads.
        """
        if name not in _TABLES:
            raise ValueError(f"unknown corpus table {name!r}; one of {sorted(_TABLES)}")
        file_name, schema = _TABLES[name]
        if name == "genes":
            # one read of the bytes: pq.read_table(path) may open a file twice (footer, then
            # data) and mix two versions across a concurrent atomic rewrite
            return parse_table(local_reader(self.root)(file_name), schema, self._where(file_name))
        snapshot = read_snapshot(local_reader(self.root), self._where,
                                 names=(SECTIONS, MANIFEST))
        return merged_tables(snapshot, self._where)[name]

    def _where(self, name: str) -> str:
        return str(self.root / name)

    def genes(self) -> pd.DataFrame:
        """The gene vocabulary as a DataFrame (empty, with its columns, when absent)."""
        return self.read_table("genes").to_pandas()

    def sections(self) -> pd.DataFrame:
        """The section table as a DataFrame (``panel`` holds int32 arrays)."""
        return self.read_table("sections").to_pandas()

    def manifest(self) -> pd.DataFrame:
        """The manifest of committed parts as a DataFrame."""
        return self.read_table("manifest").to_pandas()

    def section_dir(self, section_id: str) -> Path:
        """Where a committed section's parts live."""
        return self.shards_dir / validate_section_id(section_id)

    def section_status(self, section_id: str) -> dict[str, Any] | None:
        """The section's row as a dict, or None when the corpus has no row for it.

        ``status`` is ``committed`` only when the manifest holds exactly the row's ``n_parts``
        parts and the folder exists; a committed row without them reads ``incomplete`` (an
        interrupted commit or removal: rebuild the section).
        """
        validate_section_id(section_id)
        with self.lock():
            view = section_view(self._store, section_id)
            return self._status(section_id, view.rows, view.manifest)

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Every section's row with its `section_status` status, from one read of the tables.

        What a planner needs for a whole manifest: one pass, not one table read per section.
        Rows leave out ``panel`` (tens of millions of entries in a histMol-sized corpus).
        """
        with self.lock():
            rows = self.read_table("sections").drop_columns(["panel"]).to_pylist()
            parts: dict[str, list[dict[str, Any]]] = {}
            for part in self.read_table("manifest").select(["section_id"]).to_pylist():
                parts.setdefault(part["section_id"], []).append(part)
            statuses = {}
            for row in rows:
                status = self._status(row["section_id"], [row], parts.get(row["section_id"], []))
                assert status is not None  # a section with a row has a status
                statuses[row["section_id"]] = status
            return statuses

    def _status(
        self, section_id: str, rows: list[dict[str, Any]], manifest: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Status of one section from its own rows (`section_view`)."""
        if not rows:
            return None
        row = dict(rows[0])
        if isinstance(row.get("panel"), np.ndarray):
            row["panel"] = row["panel"].tolist()
        if row["status"] == COMMITTED:
            expected = row.get("n_parts") or 0
            folder = self.section_dir(section_id)
            if len(manifest) != expected or (expected and not folder.is_dir()):
                row["status"] = INCOMPLETE
        return row

    # ------------------------------------------------------------------ vocabulary
    def map_genes(self, genes: pd.DataFrame, species: str | None = None) -> np.ndarray:
        """Stable global indices (int32) of a section's genes; adds its unresolved keys.

        `genes` has columns gene_id, symbol, ensembl_id (an adapter's resolved table, or raw
        ids and names: both resolve through `histmol.gene_reference.resolve_features`, with
        `species` as the panel's species when it is ``human`` or ``mouse``, else inferred).
        Safe from any number of processes in any order: the indices do not depend on the
        corpus, and the unresolved keys join genes.parquet as a set union under the lock,
        before any shard can refer to them. Two genes resolving to one gene are a CorpusError
        (merge them first: `histmol.genes.merge_duplicate_genes`).
        """
        missing = [c for c in ("gene_id", "symbol", "ensembl_id") if c not in genes.columns]
        if missing:
            raise CorpusError(f"{self.root}: gene table lacks columns {missing}")
        hint = species if species in ("human", "mouse") else None
        resolved = resolve_features(genes["gene_id"].astype(str).to_numpy(object),
                                    genes["symbol"].fillna("").astype(str).to_numpy(object),
                                    hint)
        duplicated = resolved["gene_id"].duplicated(keep=False)
        if duplicated.any():
            names = sorted(genes.loc[duplicated.to_numpy(), "gene_id"].astype(str))[:6]
            raise CorpusError(f"{self.root}: features {names} resolve to the same genes; "
                              "merge them first (histmol.genes.merge_duplicate_genes)")
        if (~resolved["resolved"]).any():
            with self.lock():
                try:
                    extended = add_unresolved(self.read_table("genes"), resolved)
                except ValueError as error:
                    raise CorpusError(f"{self.root / GENES}: {error}") from error
                if extended is not None:
                    write_table(self.root / GENES, extended)
        return resolved["index"].to_numpy(np.int32)

    # ------------------------------------------------------------------ staging
    def staging_dir(self, section_id: str) -> Path:
        """A fresh ``shards/.staging-<id>.tmp-<token>`` folder for a section's parts.

        A sibling ``.lock`` file is flocked while this Corpus object lives (until `close`), so
        `cleanup_staging` elsewhere leaves it alone; it becomes stale when this process dies.
        """
        path, fd = create_staging(self.shards_dir, validate_section_id(section_id))
        self._staging_locks[path] = fd
        return path

    def discard_staging(self, staging_dir: str | os.PathLike[str]) -> None:
        """Delete a staging folder that will not be committed (e.g. its section failed)."""
        path = self._check_staging(Path(staging_dir), must_exist=False)
        remove_path(path)
        release_staging(path, self._staging_locks.pop(path, None))

    def _check_staging(self, path: Path, *, must_exist: bool = True) -> Path:
        inside = path.parent.resolve() == self.shards_dir.resolve()
        if not inside or not path.name.startswith(STAGING_PREFIX):
            raise CorpusError(f"{path}: not a staging folder of corpus {self.root}")
        path = self.shards_dir / path.name
        if must_exist and not path.is_dir():
            raise CorpusError(f"{path}: staging folder is missing")
        return path

    def cleanup_staging(self) -> list[str]:
        """Remove debris of crashed runs; return the removed names (relative to the root).

        Removes staging folders whose owner lock no process holds, trash folders, and temporary
        files of interrupted atomic writes at the root and in ``shards/``.
        """
        with self.lock():
            removed = clean_debris(self.root, self.shards_dir, set(self._staging_locks))
            return sorted(removed + remove_orphans(self._store))

    # ------------------------------------------------------------------ commits
    def commit_section(
        self,
        section_id: str,
        staging_dir: str | os.PathLike[str],
        *,
        records: Sequence[ShardRecord],
        row: Mapping[str, Any],
        force: bool = False,
    ) -> dict[str, Any]:
        """Move a staged section into place and add its rows (protocol in the module docstring).

        `row` holds the section's columns: ``platform`` (required), ``n_genes``, ``panel``
        (vocabulary indices), ``config_hash``, ``input_fingerprint`` and free scalar metadata/QC
        columns. ``n_pairs``, ``n_units`` and ``n_parts`` come from `records`. A section that is
        already committed is a CorpusError unless ``force=True`` (its staging folder is then
        left to the caller). Returns the stored row.
        """
        validate_section_id(section_id)
        staging = self._check_staging(Path(staging_dir))
        new_row = section_row(
            section_id, row, status=COMMITTED, reason=None,
            n_pairs=sum(r.n_pairs for r in records), n_units=sum(r.n_units for r in records),
            n_parts=len(records),
        )
        self._check_staged_parts(staging, records)
        new_manifest = [self._manifest_row(section_id, r) for r in records]
        with self.lock():
            view = section_view(self._store, section_id)
            check_row_types(new_row, view.schemas)  # before anything moves
            rows, manifest = view.rows, view.manifest
            current = self._status(section_id, rows, manifest)
            if current is not None and current["status"] == COMMITTED and not force:
                raise CorpusError(
                    f"{self.section_dir(section_id)}: section is already committed "
                    "(pass force=True to replace it)"
                )
            if manifest:  # 1. the loader stops reading the old parts
                commit_fragment(self._store, section_id, rows, [])
            trash = move_to_trash(self.section_dir(section_id))  # 2.
            os.rename(staging, self.section_dir(section_id))  # 3.
            fsync_dir(self.shards_dir)
            release_staging(staging, self._staging_locks.pop(staging, None))
            record = commit_fragment(self._store, section_id, [new_row], new_manifest)  # 4. live
            if trash is not None:
                remove_path(trash)  # 5.
            if len(record.fragments) >= COMPACT_AFTER:
                compact(self._store)
        return new_row

    def compact(self) -> bool:
        """Merge the committed fragments into sections.parquet and manifest.parquet.

        Returns False when there was nothing to merge. Call it when a batch of commits ends;
        readers see the same rows before and after.
        """
        with self.lock():
            return compact(self._store)

    @staticmethod
    def _manifest_row(section_id: str, record: ShardRecord) -> dict[str, Any]:
        return {
            "section_id": section_id,
            "part": record.part,
            "images_path": f"{SHARDS}/{section_id}/{record.images_path}",
            "units_path": f"{SHARDS}/{section_id}/{record.units_path}",
            "n_pairs": record.n_pairs,
            "n_units": record.n_units,
            "images_bytes": record.images_bytes,
            "units_bytes": record.units_bytes,
            "images_sha256": record.images_sha256,
            "units_sha256": record.units_sha256,
        }

    def _check_staged_parts(self, staging: Path, records: Sequence[ShardRecord]) -> None:
        expected: set[str] = set()
        for i, record in enumerate(records):
            names = (f"{part_stem(i)}.zarr", f"{part_stem(i)}.parquet")
            if record.part != i or (record.images_path, record.units_path) != names:
                raise CorpusError(f"{staging}: record {i} is {record}, expected part {i} {names}")
            expected.update(names)
        present = {p.name for p in staging.iterdir()}
        if present != expected:
            raise CorpusError(
                f"{staging}: staged files {sorted(present)} do not match the records "
                f"{sorted(expected)}"
            )

    def record_failure(self, section_id: str, row: Mapping[str, Any], reason: str) -> bool:
        """Record that building a section failed; False (nothing written) if it is committed.

        A committed section keeps its data and row. Otherwise its row becomes ``failed`` with
        `reason`, and any folder of that section (unreferenced by the manifest) is deleted.
        """
        validate_section_id(section_id)
        failed = section_row(section_id, row, status=FAILED, reason=str(reason),
                             n_pairs=0, n_units=0, n_parts=0)
        with self.lock():
            view = section_view(self._store, section_id)
            current = self._status(section_id, view.rows, view.manifest)
            if current is not None and current["status"] == COMMITTED:
                return False
            check_row_types(failed, view.schemas)
            commit_fragment(self._store, section_id, [failed], [])
            trash = move_to_trash(self.section_dir(section_id))
            if trash is not None:
                remove_path(trash)
        return True

    def remove_section(self, section_id: str) -> bool:
        """Delete a section (e.g. consent withdrawn): manifest rows, its row, files, QC figures.

        Returns False when the corpus held nothing of it. The vocabulary is kept (indices of
        other sections must not move).
        """
        validate_section_id(section_id)
        with self.lock():
            check_writable(self._store)  # refused before anything changes, as compact would
            view = section_view(self._store, section_id)
            rows, manifest = view.rows, view.manifest
            if rows or manifest:  # readers stop seeing it before its files go
                commit_fragment(self._store, section_id, [], [])
            trash = move_to_trash(self.section_dir(section_id))
            if trash is not None:
                remove_path(trash)
            # its QC figures show the tissue too: they go with the data
            figures = self.root / QC_FIGURES / section_id
            had_figures = figures.exists()
            if had_figures:
                remove_path(figures)
            compact(self._store)  # its rows (metadata, patient ids) leave the tables now
        return bool(rows or manifest) or trash is not None or had_figures

    def close(self) -> None:
        """Release the staging locks this object holds (their folders become stale debris)."""
        while self._staging_locks:
            _, fd = self._staging_locks.popitem()
            os.close(fd)

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except (AttributeError, OSError):  # half-initialised, or fds already closed at exit
            pass
