"""Prefect tasks around the stages of `histmol.build`, the one definition of a section build.

Thin on purpose: each task calls one stage function (read -> place -> gene keys -> map genes +
write + commit, the last with the QC figures) and adds what Prefect is for: retries on transient
I/O errors and task runs a user can watch. The flows (flows/ingest.py) only schedule sections;
`histmol build` and `histmol demo` run the same stages with no Prefect (`build_section`).
For a remote corpus built on Dask, `write_section_remote` maps genes, writes and commits into a
worker-local corpus and uploads the section's objects; the flow then publishes the remote tables
(histmol/shards/publish.py). Stages fetch the URL inputs they read into the cache of the process
running them (`SectionRequest.local`: none for local paths; once per process and input).

Each write task maps its own section's genes (`histmol.build.map_stage`), in whatever order and
number the sections run: indices come from the gene reference, and unresolved keys join
genes.parquet as a set union (`Corpus.map_genes`), so parallel and distributed builds are
byte-identical to serial ones.

Errors: a `HistmolError` leaving a task is re-raised as `SectionFailed`, which pickles (the
`FileProblem` errors do not: their two-argument constructor breaks unpickling on Dask workers)
and carries the original type and message. Retries happen on transient I/O errors only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from histmol.build import (
    BuildResult,
    GeneKeys,
    Placement,
    SectionRequest,
    auto_figure_dir,
    commit_remote_stage,
    commit_stage,
    gene_keys,
    map_stage,
    place_stage,
    read_stage,
)
from histmol.config import BuildConfig
from histmol.errors import HistmolError
from histmol.section import Section
from histmol.shards.remote import BuiltSection

TRANSIENT_ERRORS = (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)


class SectionFailed(HistmolError):
    """A section's stage failed; `kind` is the original error type, `reason` its message."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(kind, reason)

    def __str__(self) -> str:
        return self.reason


@contextmanager
def section_errors(request: SectionRequest | None = None) -> Iterator[None]:
    """Re-raise histmol errors as picklable `SectionFailed` (see the module docstring).

    With `request`, a URL input's local copy is named by its URL in the reason, which then
    reads the same whichever process (and cache) failed.
    """
    try:
        yield
    except SectionFailed:
        raise
    except HistmolError as err:
        reason = request.name_urls(str(err)) if request is not None else str(err)
        raise SectionFailed(type(err).__name__, reason) from None


def retry_on_io_error(task_: object, task_run: object, state: State) -> bool:
    """Retry only transient I/O failures; a bad bundle stays bad however often it is read."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


_STAGE = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retry_on_io_error,
          "cache_policy": NO_CACHE}


@task(name="read", task_run_name="read-{section_id}", **_STAGE)
def read_section(section_id: str, request: SectionRequest, config: BuildConfig) -> Section:
    """Run the platform adapter on the bundle (`histmol.build.read_stage`)."""
    with section_errors(request):
        return read_stage(request, config)


@task(name="place", task_run_name="place-{section_id}", **_STAGE)
def place_section(
    section_id: str, request: SectionRequest, section: Section, config: BuildConfig,
    out: str | None = None,
) -> Placement:
    """Register, mask tissue and plan patches (`histmol.build.place_stage`).

    With `register: auto` and `out`, the overlay goes to `<out>/qc/<section_id>/registration.png`.
    """
    figure_dir = auto_figure_dir(out, section_id, config) if out else None
    with section_errors(request):
        return place_stage(request, section, config, figure_dir=figure_dir)


@task(name="gene-keys", task_run_name="genes-{section_id}", cache_policy=NO_CACHE)
def section_gene_keys(section_id: str, request: SectionRequest, section: Section,
                      placement: Placement) -> GeneKeys:
    """The gene table and species, once placement passed (a failed section adds no genes)."""
    return gene_keys(request, section)


@task(name="tile-write", task_run_name="write-{section_id}", **_STAGE)
def write_section(
    section_id: str, out: str, request: SectionRequest, section: Section, placement: Placement,
    keys: GeneKeys, config: BuildConfig, key: str, force: bool, threads: int,
) -> BuildResult:
    """Map the section's genes, write, commit and draw its QC figures.

    `histmol.build.map_stage` then `commit_stage`, in this task: never in the flow's thread.
    """
    with section_errors(request):
        gene_index = map_stage(out, config, keys)
        return commit_stage(out, request, section, placement, gene_index, keys.species, config,
                            key, force=force, threads=threads)


@task(name="tile-write-upload", task_run_name="write-{section_id}", **_STAGE)
def write_section_remote(
    section_id: str, url: str, request: SectionRequest,
    section: Section, placement: Placement, keys: GeneKeys, config: BuildConfig, key: str,
    threads: int,
) -> tuple[BuildResult, BuiltSection]:
    """On a Dask worker: build the section locally, upload its objects to the remote corpus `url`.

    `histmol.build.commit_remote_stage` (genes mapped there): the flow publishes the tables from
    the returned rows; its step 1 (`Publisher.prepare_write`) must already have dropped the
    section's old parts from the remote manifest.
    """
    with section_errors(request):
        return commit_remote_stage(url, request, section, placement, keys, config, key,
                                   threads=threads)
