"""Corpus sources for the loader: a local path or any fsspec URL, read through its manifest.

The loader reads ``corpus.json``, ``genes.parquet``, ``sections.parquet`` and
``manifest.parquet`` (layout: DESIGN.md "Corpus layout", ``histmol.shards.corpus``) and never
lists folders: the manifest names every committed part. File systems come from
``fsspec.core.url_to_fs`` (https://filesystem-
spec.readthedocs.io/en/latest/api.html#fsspec.core.url_to_fs); a source whose file system is the
local one is read in place (``os.pread`` on the shard), any other is fetched part by part into a
local cache folder (`histmol.data.fetch`). Opening a source reads only the small tables, checked
against the corpus' commit record (``commit.json``, `histmol.shards.commit_record`): a corpus
whose tables it does not accept is refused; shard files are opened lazily, in the process
(DataLoader worker) that reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from histmol.errors import CorpusError
from histmol.shards.commit_record import RecordMismatch, parquet_bytes, read_snapshot
from histmol.shards.corpus import CORPUS_JSON, GENES, MANIFEST, SECTIONS, check_format
from histmol.shards.corpus_tables import GENES_SCHEMA, parse_table
from histmol.shards.fragments import merged_tables

LOCAL_PROTOCOLS = frozenset({"file", "local"})


@dataclass(frozen=True)
class PartRef:
    """One committed part as the manifest lists it; paths are relative to the corpus root."""

    corpus: int
    section_id: str
    part: int
    images_path: str
    units_path: str
    n_pairs: int
    n_units: int
    images_bytes: int
    units_bytes: int
    images_sha256: str
    units_sha256: str


class CorpusSource:
    """One corpus opened for reading: its file system, root and small tables (picklable)."""

    def __init__(
        self, url: str | os.PathLike[str], *, index: int = 0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = os.fspath(url)
        self.index = index
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") or "/"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local_root: Path | None = Path(self.root) if LOCAL_PROTOCOLS & set(protocols) else None
        tables, views, compacted = self._checked_tables()
        self.meta = self._read_meta(tables[CORPUS_JSON])
        self.manifest = views["manifest"]
        # the compacted bytes when nothing waits to be compacted, else those compaction writes
        manifest_bytes = tables[MANIFEST] if compacted else parquet_bytes(self.manifest)
        self.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
        genes_bytes = tables[GENES]
        self.genes_sha256 = hashlib.sha256(genes_bytes).hexdigest()
        self.genes = parse_table(genes_bytes, GENES_SCHEMA, self.describe(GENES))
        self.gene_index = self.genes.column("index").to_numpy().astype(np.int64)
        if len(self.gene_index) and np.any(np.diff(self.gene_index) <= 0):
            raise CorpusError(f"{self.describe(GENES)}: index is not strictly increasing")
        self.sections = views["sections"]

    def path(self, relative: str) -> str:
        """The file system path of a file given relative to the corpus root."""
        return f"{self.root}/{relative}" if self.root != "/" else f"/{relative}"

    def describe(self, relative: str) -> str:
        """How errors name a corpus file: the source URL joined with the relative path."""
        return f"{self.url.rstrip('/')}/{relative}"

    def read_bytes(self, relative: str) -> bytes:
        """A whole (small) corpus file; CorpusError naming it when absent or unreadable."""
        try:
            return bytes(self.fs.cat_file(self.path(relative)))
        except FileNotFoundError:
            raise CorpusError(f"{self.describe(relative)}: missing") from None
        except OSError as error:
            raise CorpusError(f"{self.describe(relative)}: unreadable ({error})") from error

    def _read_optional(self, relative: str) -> bytes | None:
        try:
            return self.read_bytes(relative)
        except CorpusError:
            if self.fs.exists(self.path(relative)):
                raise
            return None

    def _checked_tables(self) -> tuple[dict[str, bytes], dict[str, pa.Table], bool]:
        """The small tables, one consistent snapshot checked against the commit record.

        Returns the tables' bytes, the merged views (``sections``, ``manifest``: compacted plus
        fragments) and whether no fragment waits. RecordMismatch (a CorpusError naming each
        file) when the record does not accept them.
        """
        snapshot = read_snapshot(self._read_optional, self.describe)
        tables = snapshot.tables
        if tables[CORPUS_JSON] is None:
            raise CorpusError(f"{self.url}: not a histmol corpus "
                              f"({self.describe(CORPUS_JSON)}: missing)")
        if snapshot.record is None:  # an older corpus has no record: name its migration first
            self._read_meta(tables[CORPUS_JSON])
        problems = snapshot.problems()
        if problems:
            raise RecordMismatch("; ".join(f"{self.describe(name)}: {message}"
                                           for name, message in problems.items()))
        missing = [name for name, data in tables.items() if data is None]
        if missing:
            raise CorpusError(f"{self.describe(missing[0])}: missing")
        compacted = not (snapshot.record and snapshot.record.fragments)
        return ({name: data for name, data in tables.items() if data is not None},
                merged_tables(snapshot, self.describe), compacted)

    def _read_meta(self, data: bytes) -> dict[str, Any]:
        try:
            meta = json.loads(data)
        except ValueError as error:
            raise CorpusError(f"{self.describe(CORPUS_JSON)}: not JSON ({error})") from error
        check_format(meta, self.describe(CORPUS_JSON), self.url)
        return meta

    def parts(self) -> list[PartRef]:
        """The manifest's parts in manifest order (section_id, part)."""
        return [
            PartRef(corpus=self.index, **{k: row[k] for k in PartRef.__dataclass_fields__
                                          if k != "corpus"})
            for row in self.manifest.to_pylist()
        ]

    def section_rows(self) -> dict[str, dict[str, Any]]:
        """Committed sections by id (the manifest decides which sections are live)."""
        live = set(self.manifest.column("section_id").to_pylist())
        rows = {}
        for row in self.sections.to_pylist():
            if row["section_id"] in live:
                rows[row["section_id"]] = row
        missing = sorted(live - set(rows))
        if missing:
            raise CorpusError(
                f"{self.describe(SECTIONS)}: no rows for sections {missing[:5]} of the manifest"
            )
        return rows


def open_sources(
    urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    storage_options: dict[str, Any] | None = None,
    *,
    on_corrupt: str = "raise",
) -> list[CorpusSource]:
    """Open each corpus URL (a single URL or a list); ValueError when none is given.

    A corpus whose tables its commit record does not accept is refused (RecordMismatch) or, with
    ``on_corrupt="skip"``, left out with a warning naming it and its files; CorpusError when
    every corpus is left out.
    """
    if isinstance(urls, str | os.PathLike):
        urls = [urls]
    urls = list(urls)
    if not urls:
        raise ValueError("PairDataset needs at least one corpus")
    sources: list[CorpusSource] = []
    for url in urls:
        try:
            sources.append(CorpusSource(url, index=len(sources), storage_options=storage_options))
        except RecordMismatch as error:
            if on_corrupt != "skip":
                raise
            warnings.warn(f"skipping corpus {os.fspath(url)} (on_corrupt='skip'): {error}",
                          stacklevel=3)
    if not sources:
        raise CorpusError(f"{[os.fspath(u) for u in urls]}: every corpus was skipped as corrupt")
    return sources
