"""Publishing a corpus to object storage (``--out s3://bucket/corpus``): local build, remote commit.

Object stores have no rename and no lock, so a remote corpus is built in a LOCAL scratch corpus
(exactly as a local one: staging folders, flock, rename commits; see corpus.py) and each
committed section is then published with whole-object puts, in the order that keeps the remote
corpus readable at every instant (an object put is atomic: readers see the old or the new object,
https://docs.aws.amazon.com/AmazonS3/latest/userguide/Welcome.html#ConsistencyModel):

1. If the remote ``manifest.parquet`` lists parts of the section (a rebuild), put it without
   them: from here readers no longer read the section's old objects.
2. Put every file of ``shards/<id>/`` and ``qc/<id>/`` (nothing names them yet).
3. Put ``genes.parquet`` (append-only, so a superset is always safe), then ``sections.parquet``.
4. Put ``manifest.parquet``: the LAST put; now the section is live.
Steps 1, 3 and 4 put the REMOTE rows of the other sections plus this section's scratch rows,
never the scratch tables whole: the scratch may hold sections committed there and not yet
published (sections build in parallel; each is published as its build ends).
5. Delete objects under ``shards/<id>/`` that the new section does not have (an older build's).

A crash before 4 leaves the remote corpus readable without the section (its uploaded objects are
unreferenced, and the next run overwrites or deletes them); the remote ``sections.parquet`` may
then say ``committed`` while the manifest lacks the parts, which `Corpus.section_status` reads as
``incomplete``, so the next run rebuilds the section. A new remote corpus gets its empty tables
first and ``corpus.json`` last (its presence means "a corpus").

Single writer: only ONE process (the ingest flow's) may publish to a remote corpus at a time;
object stores offer no flock, and nothing here detects a second writer. Within that process the
scratch corpus' flock serialises the local commits as usual. File systems come from
``fsspec.core.url_to_fs`` (https://filesystem-spec.readthedocs.io/en/latest/api.html), so any
fsspec URL works; credentials and endpoints come from `storage_options` or fsspec's config
(``fsspec.config.conf``, ``FSSPEC_S3_*`` environment variables).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from histmol.errors import CorpusError
from histmol.remote_inputs import CACHE_ENV
from histmol.section import validate_section_id
from histmol.shards.atomic import atomic_write_bytes, remove_path, write_parquet
from histmol.shards.corpus import CORPUS_JSON, GENES, MANIFEST, SECTIONS, SHARDS, Corpus
from histmol.shards.corpus_tables import (
    MANIFEST_SCHEMA,
    SECTION_CORE_SCHEMA,
    manifest_table,
    sections_table,
)

QC = "qc"


def scratch_root(url: str) -> Path:
    """Return the local scratch corpus of the remote corpus at `url`.

    ``$HISTMOL_CACHE_DIR`` (or ~/.cache/histmol) ``/corpora/<sha256(url)[:16]>``: kept between
    runs, so unchanged sections are skipped.
    """
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "histmol")
    return base / "corpora" / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    write_parquet(sink, table)  # type: ignore[arg-type]  # pq.write_table takes a stream too
    return sink.getvalue().to_pybytes()


class RemoteCorpus:
    """A remote corpus root and its local scratch corpus; the flow process' single publisher."""

    def __init__(self, url: str, *, local: Path | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.local = local if local is not None else scratch_root(self.url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = root.rstrip("/")

    def _key(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _put(self, relative: str, data: bytes) -> None:
        """One whole-object put (atomic on object stores)."""
        try:
            self.fs.pipe_file(self._key(relative), data)
        except OSError as error:
            raise CorpusError(f"{self.url}/{relative}: upload failed ({error})") from error

    def _get(self, relative: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._key(relative)))
        except FileNotFoundError:
            return None

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
        for name in (GENES, SECTIONS, MANIFEST):
            data = self._get(name)
            if data is None:
                raise CorpusError(f"{self.url}/{name}: missing from a corpus that has corpus.json")
            atomic_write_bytes(self.local / name, data)
        atomic_write_bytes(self.local / CORPUS_JSON, meta)  # last, as in Corpus._initialise

    def initialise(self) -> None:
        """Create the remote corpus from the scratch one if absent: tables, then corpus.json."""
        if self.fs.exists(self._key(CORPUS_JSON)):
            return
        for name in (GENES, SECTIONS, MANIFEST, CORPUS_JSON):
            self._put(name, (self.local / name).read_bytes())

    def _remote_rows(self, name: str, schema: pa.Schema) -> list[dict[str, Any]]:
        data = self._get(name)
        table = schema.empty_table() if data is None else pq.read_table(pa.BufferReader(data))
        return table.to_pylist()

    def _merged(self, section_id: str) -> tuple[bytes, bytes]:
        """Return (sections, manifest) bytes: remote rows of others plus this section's own.

        If the remote manifest lists the section, it is put without it first (step 1). Never
        the scratch tables whole: they may hold sections committed in the scratch but not yet
        published (their objects are not uploaded).
        """
        local = Corpus.open(self.local)
        tables = []
        for name, schema, key, build in (
            (SECTIONS, SECTION_CORE_SCHEMA, "sections", sections_table),
            (MANIFEST, MANIFEST_SCHEMA, "manifest", manifest_table),
        ):
            remote = self._remote_rows(name, schema)
            others = [r for r in remote if r["section_id"] != section_id]
            mine = [r for r in local.read_table(key).to_pylist() if r["section_id"] == section_id]
            tables.append(_parquet_bytes(build(others + mine)))
        if len(others) != len(remote):  # the manifest's (last loop); step 1
            self._put(MANIFEST, _parquet_bytes(manifest_table(others)))
        return tables[0], tables[1]

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

    def publish_section(self, section_id: str) -> None:
        """Publish a section committed in the scratch corpus (steps 1-5 of the module docstring)."""
        validate_section_id(section_id)
        status = Corpus.open(self.local).section_status(section_id)
        if status is None or status["status"] != "committed":
            raise CorpusError(f"{self.local}: section {section_id!r} is not committed here")
        sections, manifest = self._merged(section_id)
        kept = self._upload_tree(f"{SHARDS}/{section_id}")
        self._upload_tree(f"{QC}/{section_id}")
        self._put(GENES, (self.local / GENES).read_bytes())  # append-only: a superset is safe
        self._put(SECTIONS, sections)
        self._put(MANIFEST, manifest)  # last: the section is live
        self._delete_other_objects(f"{SHARDS}/{section_id}", kept)

    def publish_failure(self, section_id: str) -> None:
        """Publish a failed section's row: manifest rows go first, then tables, then its objects."""
        status = Corpus.open(self.local).section_status(validate_section_id(section_id))
        if status is not None and status["status"] == "committed":
            return  # record_failure kept the committed section: nothing changed
        sections, _ = self._merged(section_id)
        self._put(GENES, (self.local / GENES).read_bytes())
        self._put(SECTIONS, sections)
        self._delete_other_objects(f"{SHARDS}/{section_id}", set())
