"""Where each section's outcome goes: the corpus at `out`, or a remote corpus through its scratch.

An ingest builds sections in parallel and in any order; this module decides, per section, what
the single process that owns the corpus' tables (the ingest flow's) writes when a section
starts its write, commits or fails. `Publisher.open(out)` gives:

- a LOCAL corpus: the section's write task commits it in `out`; a failure is recorded there
  (`Corpus.record_failure`: a committed section keeps its last good data).
- a REMOTE corpus (`out` an fsspec URL), built IN-PROCESS: sections are committed in the local
  scratch corpus (`RemoteCorpus.local`) and published as each ends (`publish_section`: steps 1-5
  of histmol/shards/remote.py).
- a REMOTE corpus built by workers that share no disk (`upload=True`, a Dask cluster): before a
  worker overwrites a section's objects, `prepare_write` commits its row without its parts
  (step 1); the worker builds and uploads the section (step 2) and returns its rows; `committed`
  adds the section's unresolved gene keys to the scratch vocabulary (an order-free set union:
  the indices were computed by the worker, from the reference) and commits its rows (steps
  3-5, `publish_built`). `finish` merges the run's table fragments into the tables, once.
  Only this process writes remote tables: object stores have no lock.

A live remote section whose parts are still listed keeps its last good data when a rebuild
fails, as a committed local section does; once its parts were dropped (step 1) its failure is
recorded and published (`publish_failure`). Only public methods of `RemoteCorpus` and `Corpus`
are used here, so the table layout stays theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from histmol.remote_inputs import is_url
from histmol.shards.corpus import Corpus
from histmol.shards.remote import BuiltSection, RemoteCorpus


class Publisher:
    """The outcome side of an ingest: one per run, called from the one process that owns tables.

    `local` is where sections commit in this process (`out`, or the remote corpus' scratch);
    `published` the sections live in the remote corpus when the run started (None for a local
    corpus, whose own tables tell).
    """

    def __init__(self, local: Path, remote: RemoteCorpus | None = None, *, upload: bool = False,
                 published: set[str] | None = None) -> None:
        if upload and remote is None:
            raise ValueError("upload needs a remote corpus")
        self.local, self.remote, self.upload = local, remote, upload
        self.published = None if remote is None else set(published or ())
        self._dropped: set[str] = set()

    @classmethod
    def open(cls, out: str, *, upload: bool = False) -> Publisher:
        """The publisher of `out`: a local path, or a remote URL (its tables pulled into scratch).

        `upload`: sections are built and uploaded by workers (only meaningful for a URL).
        """
        if not is_url(out):
            return cls(Path(out))
        remote = RemoteCorpus(out)
        remote.pull()
        live = remote.published_sections() if remote.local.is_dir() else set()
        return cls(remote.local, remote, upload=upload, published=live)

    @property
    def url(self) -> str | None:
        """The remote corpus' URL (None for a local corpus)."""
        return self.remote.url if self.remote is not None else None

    def initialise(self) -> None:
        """Create the remote corpus from the scratch one if absent (after planning made it)."""
        if self.remote is not None:
            self.remote.initialise()

    def prepare_write(self, section_id: str) -> None:
        """Before a worker (re)writes a section's objects: step 1, and drop a stale scratch copy.

        Only for `upload`; a no-op otherwise (in-process builds commit in the scratch, and
        `publish_section` drops the parts itself). The scratch copy of an earlier in-process run
        would be stale now, and would hide a failure of this build.
        """
        if not self.upload:
            return
        assert self.remote is not None
        self.remote.drop_section_parts(section_id)
        self._dropped.add(section_id)
        Corpus.open(self.local).remove_section(section_id)

    def committed(self, section_id: str, built: BuiltSection | None = None,
                  genes: pd.DataFrame | None = None, species: str | None = None) -> None:
        """A section's write task committed it: publish it (remote), nothing more (local).

        `upload`: `built` is what the worker returned, `genes`/`species` the section's gene
        table (its unresolved keys join the vocabulary before the tables are put).
        """
        if self.remote is None:
            return
        if not self.upload:
            self.remote.publish_section(section_id)
            return
        if built is None or genes is None:
            raise ValueError(f"section {section_id!r}: an upload needs its rows and genes")
        Corpus.open(self.local).map_genes(genes, species=species)
        self.remote.publish_built(built)

    def failed(self, section_id: str, platform: str, reason: str,
               corpus_fields: Mapping[str, Any]) -> None:
        """Record a failed section (and publish it), unless it keeps its last good data.

        A committed local section keeps its data (`Corpus.record_failure`); so does a live
        remote one whose parts are still listed (it was never dropped for a rewrite).
        """
        live = self.published is not None and section_id in self.published
        if live and section_id not in self._dropped:
            return
        corpus = Corpus.open(self.local, create=True, build_config=corpus_fields)
        corpus.record_failure(section_id, {"platform": platform}, reason)
        if self.remote is not None:
            self.remote.publish_failure(section_id)

    def finish(self) -> None:
        """Merge the run's table fragments into the tables, here and in the remote corpus.

        Once per ingest (`histmol.shards.fragments`): each commit wrote only its own rows.
        """
        if (self.local / "corpus.json").exists():
            Corpus.open(self.local).compact()
        if self.remote is not None:
            self.remote.compact()
