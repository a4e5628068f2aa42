"""Prefect tasks for the stages of one section, and the flow behind `histmol build`/`histmol demo`.

Thin on purpose (STYLE.md): each task calls one stage function of `histmol.build`; flows wire
them. Stages: read (adapter) -> register (registration, tissue mask, patch plan) -> gene keys
-> tile/write (extract patches into a staging folder) -> commit (nested in tile/write, so the
staging folder's owner lock is held by one process from creation to commit). For a remote corpus
built on Dask, `write_section_remote` runs tile/write + commit into a worker-local corpus and
uploads the section's objects; the flow then commits the remote tables. A stage that reads
inputs first fetches the request's URL inputs it needs into the cache of the process running it
(`histmol.manifest.with_local_inputs`: none for local paths; once per process and input).

The vocabulary is the one order-dependent table of a corpus (`Corpus.map_genes` appends new genes
in call order), so the flows map genes section by section in request order, never from inside
parallel tasks: that is what makes parallel and distributed builds byte-identical to serial ones.

Errors: a `HistmolError` leaving a task is re-raised as `SectionFailed`, which pickles (the
`FileProblem` errors do not: their two-argument constructor breaks unpickling on Dask workers)
and carries the original type and message. Retries happen on transient I/O errors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

import histmol
from histmol.build import (
    BuildResult,
    SectionRequest,
    check_existing,
    plan_stage,
    read_stage,
    register_stage,
    section_row,
    tissue_stage,
    write_stage,
)
from histmol.config import BuildConfig
from histmol.errors import HistmolError
from histmol.fingerprint import input_fingerprint
from histmol.genes import infer_species
from histmol.manifest import RemoteInputRequest, with_local_inputs
from histmol.registration import Registration
from histmol.section import Section
from histmol.shards.atomic import remove_path
from histmol.shards.corpus import Corpus
from histmol.shards.remote import BuiltSection, RemoteCorpus
from histmol.shards.staging import (
    LOCK_SUFFIX,
    STAGING_PREFIX,
    create_staging,
    release_staging,
    remove_if_stale,
)
from histmol.tiling import PatchPlan
from histmol.wsi import open_wsi

FILE_OPTIONS = ("alignment", "counts", "positions", "transform")
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
        reason = str(err)
        if isinstance(request, RemoteInputRequest):
            reason = request.name_urls(reason)
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


def cache_key(request: SectionRequest, config: BuildConfig) -> str:
    """Hash what decides a section's bytes: inputs (stat), histmol version, config, request.

    Adapter options naming files (alignment, ...) are fingerprinted by stat and hashed by name
    only, so a moved source tree keeps its key (as `SectionRequest.fingerprint` does). URL inputs
    count by their listing (`RemoteInputRequest`), so the key needs no downloaded copy.
    """
    sources = request.sources if isinstance(request, RemoteInputRequest) else {}
    files = [Path(v) for k, v in sorted(request.options.items()) if k in FILE_OPTIONS
             and k not in sources and isinstance(v, str | Path) and Path(v).exists()]
    remote = [sources[k].fingerprint for k in sorted(request.options) if k in sources]
    options = {k: Path(v).name if k in FILE_OPTIONS and isinstance(v, str | Path) else v
               for k, v in request.options.items()}
    payload = {
        "histmol": histmol.__version__,
        "config": config.fingerprint(),
        "inputs": [request.fingerprint(), input_fingerprint(*files), *remote],
        "platform": request.platform,
        "section_id": request.resolved_section_id(),
        "options": options,
        "metadata": {k: v for k, v in request.metadata.items() if v},
    }
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Placement:
    """The register stage's output: units on the slide, the kept patch plan and its QC."""

    registration: Registration
    plan: PatchPlan
    plan_qc: dict[str, Any]
    pair_tissue: np.ndarray


@dataclass(frozen=True)
class GeneKeys:
    """What the flow needs to extend the vocabulary: the gene table and the species."""

    genes: pd.DataFrame
    species: str


_STAGE = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retry_on_io_error,
          "cache_policy": NO_CACHE}


logger = logging.getLogger(__name__)


@task(name="read", task_run_name="read-{section_id}", **_STAGE)
def read_section(section_id: str, request: SectionRequest, config: BuildConfig) -> Section:
    """Run the platform adapter on the bundle."""
    with section_errors(request):
        return read_stage(with_local_inputs(request), config)


@task(name="register", task_run_name="register-{section_id}", **_STAGE)
def register_section(
    section_id: str, request: SectionRequest, section: Section, config: BuildConfig,
    out: str | None = None,
) -> Placement:
    """Place units on the slide, mask tissue and plan patches (QC failures raise here).

    With `register: auto` and `out`, the overlay goes to `<out>/qc/<section_id>/registration.png`.
    """
    with section_errors(request):
        request = with_local_inputs(request, "wsi", "transform", "landmarks")
    figure_dir = Path(out) / "qc" / section_id if out and config.register == "auto" else None
    with section_errors(request), open_wsi(request.wsi) as slide:
        registration = register_stage(section, slide, config, request.transform,
                                      request.landmarks, figure_dir=figure_dir)
        mask = tissue_stage(slide, registration.mpp, config)
        plan, plan_qc, pair_tissue = plan_stage(section, registration, mask, config)
    return Placement(registration, plan, plan_qc, pair_tissue)


@task(name="gene-keys", task_run_name="genes-{section_id}", cache_policy=NO_CACHE)
def gene_keys(section_id: str, request: SectionRequest, section: Section,
              placement: Placement) -> GeneKeys:
    """Return the gene table and species once registration passed (failures add no genes)."""
    species = request.metadata.get("species") or infer_species(section.genes) or "unknown"
    return GeneKeys(section.genes[["gene_id", "symbol", "ensembl_id"]].copy(), species)


def map_genes(out: str, config: BuildConfig, keys: GeneKeys) -> np.ndarray:
    """Vocabulary indices of a section's genes, creating the corpus if needed (call in order)."""
    with section_errors():
        corpus = Corpus.open(out, create=True, build_config=config.corpus_fields())
        return corpus.map_genes(keys.genes, species=keys.species)


@task(name="tile-write", task_run_name="write-{section_id}", **_STAGE)
def write_section(
    section_id: str, out: str, request: SectionRequest, section: Section, placement: Placement,
    gene_index: np.ndarray, species: str, config: BuildConfig, key: str, force: bool,
    threads: int,
) -> BuildResult:
    """Extract and write every kept patch into a staging folder, then commit it."""
    started = time.perf_counter()
    with section_errors(request):
        request = with_local_inputs(request, "wsi")
    with section_errors(request), Corpus.open(out, build_config=config.corpus_fields()) as corpus:
        staging = corpus.staging_dir(section_id)
        committed = False
        try:
            with open_wsi(request.wsi) as slide:
                reg, plan = placement.registration, placement.plan
                records, timings = write_stage(
                    staging, section, reg, plan, placement.pair_tissue, gene_index, slide,
                    config, threads=threads,
                )
                qc = {**placement.plan_qc, **reg.qc, **section.qc}
                row = section_row(section, request, reg, plan, config, request.fingerprint(),
                                  species, gene_index, slide, qc)
            row["cache_key"] = key
            commit_section(section_id, out, str(staging), records, row, force)
            committed = True
        finally:
            if not committed:
                corpus.discard_staging(staging)
    write_figures(out, section_id, request.wsi)
    n_units = int((plan.unit_pair >= 0).sum())
    return BuildResult(
        section_id, request.platform, "committed", "", plan.n_pairs, n_units, section.n_genes,
        sum(r.images_bytes + r.units_bytes for r in records), time.perf_counter() - started,
        {k: v for k, v in row.items() if k != "panel"}, timings,
    )


SCRATCH_DIR = "histmol-remote-builds"


@contextmanager
def worker_scratch(section_id: str) -> Iterator[Path]:
    """A private folder under ``<temp dir>/histmol-remote-builds/``, removed when done.

    Each folder has a sibling lock file its owner flocks while it lives
    (`histmol.shards.staging`), so the folders of a worker that was killed (``kill -9``, out of
    memory: no cleanup runs) are told from live ones and removed by the next build there.
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


@task(name="tile-write-upload", task_run_name="write-{section_id}", **_STAGE)
def write_section_remote(
    section_id: str, url: str, storage_options: dict[str, Any] | None, request: SectionRequest,
    section: Section, placement: Placement, gene_index: np.ndarray, species: str,
    config: BuildConfig, key: str, threads: int,
) -> tuple[BuildResult, BuiltSection]:
    """On a Dask worker: build the section locally, upload its objects to the remote corpus `url`.

    Workers share no disk, so the section is built (parts, commit, QC figures: the same bytes as
    `write_section`) into a corpus in the worker's scratch folder (`worker_scratch`), removed
    afterwards whatever happens; only its objects are put (step 2 of histmol/shards/remote.py).
    The flow commits the tables from the returned rows. Its step 1 must already have dropped the
    section's old parts from the remote manifest.
    """
    with worker_scratch(section_id) as tmp:
        root = tmp / "corpus"
        with section_errors():
            Corpus.open(root, create=True, build_config=config.corpus_fields())
        result = write_section.fn(section_id, str(root), request, section, placement, gene_index,
                                  species, config, key, True, threads)
        with section_errors():
            remote = RemoteCorpus(url, local=root, storage_options=storage_options)
            built = remote.upload_section(section_id)
    return result, built


def write_figures(out: str, section_id: str, wsi: Path) -> None:
    """QC figures of a committed section under `<out>/qc/<section_id>/` (cheap: ~2 s).

    A drawing failure must not undo a good build: it is logged, and `histmol qc` can redo it.
    """
    from histmol.qc.figures import write_section_figures

    try:
        write_section_figures(out, section_id, Path(out) / "qc", slide=wsi)
    except Exception as error:  # noqa: BLE001 - figures are a by-product, never a failure
        logger.warning("%s: QC figures not written: %s", section_id, error)


@task(name="commit", task_run_name="commit-{section_id}", **_STAGE)
def commit_section(section_id: str, out: str, staging: str, records: list[Any],
                   row: dict[str, Any], force: bool) -> None:
    """Publish the staged section: rename into place, then rewrite the tables (manifest last)."""
    with section_errors(), Corpus.open(out) as corpus:
        corpus.commit_section(section_id, staging, records=records, row=row, force=force)


def record_failure(out: str, config: BuildConfig, section_id: str, platform: str,
                   reason: str) -> None:
    """Write a `failed` row with the reason (a committed section keeps its last good data)."""
    corpus = Corpus.open(out, create=True, build_config=config.corpus_fields())
    corpus.record_failure(section_id, {"platform": platform}, reason)


def build_one(request: SectionRequest, out: str, config: BuildConfig, force: bool,
              threads: int) -> BuildResult:
    """Run the stages of one section in this process, as task runs; errors propagate."""
    section_id = request.resolved_section_id()
    if (Path(out) / "corpus.json").exists():
        corpus = Corpus.open(out, build_config=config.corpus_fields())
        skipped = check_existing(corpus, section_id, request.platform, config,
                                 request.fingerprint(), force)
        if skipped is not None:
            return skipped
    section = read_section(section_id, request, config)
    placement = register_section(section_id, request, section, config, out)
    keys = gene_keys(section_id, request, section, placement)
    gene_index = map_genes(out, config, keys)
    return write_section(section_id, out, request, section, placement, gene_index, keys.species,
                         config, cache_key(request, config), force, threads)


@flow(name="build-sections", log_prints=False)
def build_sections(
    requests: list[SectionRequest],
    out: str,
    config: BuildConfig | None = None,
    force: bool = False,
    threads: int = 2,
) -> list[BuildResult]:
    """Build the given sections one after another into the corpus at `out`; first failure raises.

    An unchanged committed section is skipped; a changed one is refused unless `force`.
    """
    config = config or BuildConfig()
    return [build_one(request, out, config, force, threads) for request in requests]
