"""Publishing a corpus to object storage (``--out s3://bucket/corpus``): local build, remote commit.

Object stores have no rename and no lock, so a remote corpus is built in a LOCAL scratch corpus
(exactly as a local one: staging folders, flock, rename commits; see corpus.py) and each
committed section is then published with whole-object puts, in the order that keeps the remote
corpus readable at every instant (an object put is atomic: readers see the old or the new object,
https://docs.aws.amazon.com/AmazonS3/latest/userguide/Welcome.html#ConsistencyModel):

1. If the remote corpus lists parts of the section (a rebuild), commit the section's fragment
   without them: from here readers no longer read the section's old objects.
2. Put every file of ``shards/<id>/`` and ``qc/<id>/`` (nothing names them yet).
3. Put ``genes.parquet`` when the scratch's differs (append-only, so a superset is always safe).
4. Commit the section's fragment (its row and manifest rows, `histmol.shards.fragments`): two
   small objects, then ``commit.json`` naming them; now the section is live.
5. Delete objects under ``shards/<id>/`` that the new section does not have (an older build's).
A publish costs the same whatever the size of the remote corpus; `compact` (at the end of an
ingest) merges the fragments into the remote ``sections.parquet`` and ``manifest.parquet``. The
genes put sits between two puts of ``commit.json`` (pending digest, then promoted; see
`histmol.shards.commit_record`), so the record covers the remote tables at every instant. Steps
1 and 4 write this section's rows only: the scratch may hold sections committed there and not
yet published (sections build in parallel; each is published as its build ends).

A crash before 4 leaves the remote corpus readable without the section (its uploaded objects are
unreferenced, and the next run overwrites or deletes them); after step 1 alone the remote row
says ``committed`` while the manifest lacks the parts, which `published_sections` (and
`Corpus.section_status`) read as not live, so the next run rebuilds the section. A new remote
corpus gets its empty tables first and ``corpus.json`` last (its presence means "a corpus").

On a Dask cluster (workers share no disk) the steps split between two processes: the flow does
step 1 (`drop_section_parts`) BEFORE it hands the section to a worker; the worker builds it in a
worker-local corpus and does step 2 (`upload_section`, which returns the section's rows as a
small `BuiltSection`); the flow then does steps 3-5 (`publish_built`). The objects and tables
are the same bytes either way.

Single writer: only ONE process (the ingest flow's) may write the remote TABLES at a time;
object stores offer no flock, and nothing here detects a second writer. Workers only put the
objects of the section they were handed. Within the flow process the scratch corpus' flock
serialises the local commits as usual. File systems come from
``fsspec.core.url_to_fs`` (https://filesystem-spec.readthedocs.io/en/latest/api.html), so any
fsspec URL works; credentials and endpoints come from `storage_options` or fsspec's config
(``fsspec.config.conf``, ``FSSPEC_S3_*`` environment variables).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from histmol.errors import CorpusError
from histmol.remote_inputs import CACHE_ENV
from histmol.section import validate_section_id
from histmol.shards.atomic import atomic_write_bytes, remove_path
from histmol.shards.commit_record import FRAGMENTS_DIR, RECORD, CommitRecord, Digest, record_write
from histmol.shards.corpus import (
    COMMITTED,
    CORPUS_JSON,
    GENES,
    MANIFEST,
    SECTIONS,
    SHARDS,
    Corpus,
)
from histmol.shards.fragments import TableStore, commit_fragment, compact, section_view
from histmol.shards.staging import (
    LOCK_SUFFIX,
    STAGING_PREFIX,
    create_staging,
    release_staging,
    remove_if_stale,
)

QC = "qc"
SCRATCH_DIR = "histmol-remote-builds"


def scratch_root(url: str) -> Path:
    """Return the local scratch corpus of the remote corpus at `url`.

    ``$HISTMOL_CACHE_DIR`` (or ~/.cache/histmol) ``/corpora/<sha256(url)[:16]>``: kept between
    runs, so unchanged sections are skipped.
    """
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "histmol")
    return base / "corpora" / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class BuiltSection:
    """A section whose objects a worker uploaded (step 2): its table rows, for the flow to commit.

    `sections_row` and `manifest_rows` are the rows the worker-local corpus committed;
    `uploaded` the object names (relative to the corpus root) now holding its parts.
    """

    section_id: str
    sections_row: dict[str, Any]
    manifest_rows: list[dict[str, Any]]
    uploaded: frozenset[str]


class RemoteCorpus:
    """A remote corpus root and a local corpus: the flow's scratch, or a worker's own build."""

    def __init__(self, url: str, *, local: Path | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.local = local if local is not None else scratch_root(self.url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        # late-bound, so a wrapped _put/_get (tests, instrumentation) sees every store access
        self._store = TableStore(lambda name: self._get(name),
                                 lambda name, data: self._put(name, data),
                                 lambda name: self._delete(name),
                                 lambda: self._fragment_names(),
                                 lambda name: f"{self.url}/{name}")

    def _key(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _put(self, relative: str, data: bytes) -> None:
        """One whole-object put (atomic on object stores)."""
        try:
            self.fs.pipe_file(self._key(relative), data)
        except OSError as error:
            raise CorpusError(f"{self.url}/{relative}: upload failed ({error})") from error

    def _put_table(self, relative: str, data: bytes) -> None:
        """Put a corpus table between two puts of ``commit.json`` (pending, then promoted).

        See `histmol.shards.commit_record`: readers accept the old or the new bytes at every
        instant, and the record's last put makes the new ones the committed state.
        """
        record_write(self._get, self._put, relative, data, lambda name: f"{self.url}/{name}")

    def _get(self, relative: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._key(relative)))
        except FileNotFoundError:
            return None

    def _delete(self, relative: str) -> None:
        try:
            self.fs.rm_file(self._key(relative))
        except FileNotFoundError:
            pass

    def _fragment_names(self) -> list[str]:
        prefix = self._key(FRAGMENTS_DIR)
        if not self.fs.exists(prefix):
            return []
        return sorted(f"{FRAGMENTS_DIR}/{key.rsplit('/', 1)[-1]}" for key in self.fs.find(prefix))

    def pull(self) -> None:
        """Make the scratch corpus' tables those of the remote corpus (the truth).

        No remote corpus: the scratch is emptied (a new corpus is built from nothing). Section
        folders already in the scratch stay; `Corpus.section_status` trusts them only where the
        pulled tables say committed, with the same parts.
        """
        meta = self._get(CORPUS_JSON)
        if meta is None:
            remove_path(self.local)
            return
        (self.local / SHARDS).mkdir(parents=True, exist_ok=True)
        record = self._get(RECORD)
        remove_path(self.local / RECORD)  # until the copy is whole: a crash leaves no stale record
        remove_path(self.local / FRAGMENTS_DIR)
        fragments = ({} if record is None else
                     CommitRecord.from_bytes(record, f"{self.url}/{RECORD}").fragment_files())
        for name in (GENES, SECTIONS, MANIFEST, *sorted(fragments)):
            data = self._get(name)
            if data is None:
                raise CorpusError(f"{self.url}/{name}: missing from a corpus that has corpus.json")
            (self.local / name).parent.mkdir(exist_ok=True)
            atomic_write_bytes(self.local / name, data)
        atomic_write_bytes(self.local / CORPUS_JSON, meta)  # last, as in Corpus._initialise
        if record is not None:  # absent: the scratch adopts the tables on its first write
            atomic_write_bytes(self.local / RECORD, record)

    def initialise(self) -> None:
        """Create the remote corpus from the scratch one if absent: tables, then corpus.json."""
        if self.fs.exists(self._key(CORPUS_JSON)):
            return
        for name in (GENES, SECTIONS, MANIFEST, CORPUS_JSON):
            self._put_table(name, (self.local / name).read_bytes())

    def published_sections(self) -> set[str]:
        """Sections live in the pulled tables: a committed row and exactly its ``n_parts`` parts.

        The remote tables are the truth (a section built on a worker has no scratch folder), so
        call this right after `pull`.
        """
        local = Corpus.open(self.local)
        parts: dict[str, int] = {}
        for row in local.read_table("manifest").to_pylist():
            parts[row["section_id"]] = parts.get(row["section_id"], 0) + 1
        return {r["section_id"] for r in local.read_table("sections").to_pylist()
                if r["status"] == COMMITTED and parts.get(r["section_id"], 0) == r["n_parts"]}

    def drop_section_parts(self, section_id: str) -> None:
        """Step 1: if the remote corpus lists the section's parts, commit its row without them."""
        view = section_view(self._store, validate_section_id(section_id))
        if view.manifest:
            commit_fragment(self._store, section_id, view.rows, [])

    def _put_genes(self) -> None:
        """Step 3: put the scratch's genes.parquet unless the remote record already holds it."""
        data = (self.local / GENES).read_bytes()
        raw = self._get(RECORD)
        if raw is not None:
            record = CommitRecord.from_bytes(raw, f"{self.url}/{RECORD}")
            if record.tables.get(GENES) == Digest.of(data) and not record.pending:
                return
        self._put_table(GENES, data)

    def compact(self) -> bool:
        """Merge the remote fragments into the remote tables (`histmol.shards.fragments`)."""
        return compact(self._store)

    def _local_rows(self, section_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Return the section's rows in the local corpus (sections, manifest)."""
        local = Corpus.open(self.local)
        sections = [r for r in local.read_table("sections").to_pylist()
                    if r["section_id"] == section_id]
        manifest = [r for r in local.read_table("manifest").to_pylist()
                    if r["section_id"] == section_id]
        return sections, manifest

    def _upload_tree(self, relative: str) -> set[str]:
        folder = self.local / relative
        uploaded: set[str] = set()
        if not folder.is_dir():
            return uploaded
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(self.local).as_posix()
                self._put(name, path.read_bytes())
                uploaded.add(self._key(name))
        return uploaded

    def _delete_other_objects(self, relative: str, keep: set[str]) -> None:
        prefix = self._key(relative)
        if not self.fs.exists(prefix):
            return
        stale = sorted(set(self.fs.find(prefix)) - keep)
        if stale:
            self.fs.rm(stale)

    def upload_section(self, section_id: str) -> BuiltSection:
        """Step 2: put the objects of a section committed in the LOCAL corpus; return its rows.

        Run by the flow (in-process builds) or by a Dask worker on its worker-local corpus; it
        writes no remote table.
        """
        validate_section_id(section_id)
        status = Corpus.open(self.local).section_status(section_id)
        if status is None or status["status"] != COMMITTED:
            raise CorpusError(f"{self.local}: section {section_id!r} is not committed here")
        sections_rows, manifest_rows = self._local_rows(section_id)
        uploaded = self._upload_tree(f"{SHARDS}/{section_id}")
        self._upload_tree(f"{QC}/{section_id}")
        prefix = f"{self.root}/"
        return BuiltSection(section_id, sections_rows[0], manifest_rows,
                            frozenset(key[len(prefix):] for key in uploaded))

    def publish_built(self, built: BuiltSection) -> None:
        """Do steps 3-5 for a section whose objects are uploaded: tables, manifest last, cleanup.

        ``genes.parquet`` comes from the scratch corpus, where the flow maps every section's
        genes (an order-free union of unresolved keys).
        """
        section_id = validate_section_id(built.section_id)
        self._put_genes()  # append-only: a superset is always safe
        commit_fragment(self._store, section_id, [built.sections_row],
                        list(built.manifest_rows))  # the section is live
        self._delete_other_objects(f"{SHARDS}/{section_id}",
                                   {self._key(name) for name in built.uploaded})

    def publish_section(self, section_id: str) -> None:
        """Publish a section committed in the scratch corpus (steps 1-5 of the module docstring)."""
        status = Corpus.open(self.local).section_status(validate_section_id(section_id))
        if status is None or status["status"] != COMMITTED:
            raise CorpusError(f"{self.local}: section {section_id!r} is not committed here")
        self.drop_section_parts(section_id)
        self.publish_built(self.upload_section(section_id))

    def publish_failure(self, section_id: str) -> None:
        """Publish a failed section's row: manifest rows go first, then tables, then its objects."""
        status = Corpus.open(self.local).section_status(validate_section_id(section_id))
        if status is not None and status["status"] == COMMITTED:
            return  # record_failure kept the committed section: nothing changed
        self.drop_section_parts(section_id)
        sections_rows, _ = self._local_rows(section_id)
        self._put_genes()
        commit_fragment(self._store, section_id, sections_rows, [])
        self._delete_other_objects(f"{SHARDS}/{section_id}", set())


@contextmanager
def worker_scratch(section_id: str) -> Iterator[Path]:
    """A private folder under ``<temp dir>/histmol-remote-builds/``, removed when done.

    Where a Dask worker (no shared disk) builds a section before `upload_section`. Each folder
    has a sibling lock file its owner flocks while it lives (`histmol.shards.staging`), so the
    folders of a worker that was killed (``kill -9``, out of memory: no cleanup runs) are told
    from live ones and removed by the next build there.
    """
    parent = Path(tempfile.gettempdir()) / SCRATCH_DIR
    parent.mkdir(exist_ok=True)
    for entry in parent.iterdir():  # folders (or lone lock files) no live process holds
        if entry.name.startswith(STAGING_PREFIX):
            remove_if_stale(entry.with_name(entry.name.removesuffix(LOCK_SUFFIX)))
    folder, fd = create_staging(parent, section_id)
    try:
        yield folder
    finally:
        remove_path(folder)
        release_staging(folder, fd)
