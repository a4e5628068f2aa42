"""The `ingest-corpus` flow: every section of a manifest into one corpus, resumably, in parallel.

`ingest_corpus(manifest, out, ...)` loads the manifest (histmol/manifest.py), skips sections whose
skip key (`histmol.build.section_key`: inputs, adapter options, metadata, config, histmol version)
matches their committed row, and runs the stage tasks of the others (flows/build.py around
`histmol.build`'s stages): read -> place -> gene keys -> map genes + tile/write + commit.
`run_ingest` runs it from a library call or `histmol ingest`, against a private Prefect server
unless PREFECT_API_URL is set (flows/server.py). The corpus is the cache: it holds each section's
key, so deleting or moving a corpus can never leave a stale Prefect result behind (Prefect's own
result cache is off).

Scheduling is Prefect's: each section is a chain of task runs submitted at once with the upstream
futures as parameters, and at most `max_parallel` sections are in flight (memory holds at most
that many sections' data); when one ends (a done callback of its last task run), the next is
submitted. Sections run and finish in any order: a section's genes are mapped in its own write
task (indices come from the gene reference, unresolved keys join genes.parquet as a set union), so
the corpus is byte-identical whatever the runner, the worker count or the interruption history;
outcomes are reported in manifest order. Runners: Prefect's thread pool in this process, or an
existing dask.distributed cluster (`dask_address`) through prefect-dask's DaskTaskRunner. Dask
workers are separate processes and cannot reach this process's private Prefect API, so a Dask run
needs a real API (`PREFECT_API_URL`, e.g. `prefect server start`); Prefect hands its URL to the
workers with each task.

Outcomes go through `histmol.shards.publish.Publisher`, the storage layer's publish protocol.
Remote corpora (`out` an fsspec URL): this process pulls the remote tables into a local scratch
corpus, where it plans and records failures, and is the single writer of the remote tables.
In-process, sections are built in the scratch and published as each ends. On Dask (workers share
no disk), once a section's gene keys are read this process drops its old parts from the remote
manifest and only then submits its write; the worker builds the section (parts and QC figures) in
a corpus under its own temp dir, uploads the objects and returns the rows; this process then puts
genes, sections and, last, the manifest. Both give the same objects, byte for byte. Local input
paths must be readable at the same paths on every worker; URL inputs are only listed here (their
listing decides skips) and fetched by the stages that read them, into the cache of the process
running each (a worker's own; histmol/remote_inputs.py), so with a Dask runner this process
downloads no input at all.

Failures are isolated: a section that fails (bad input, adapter error, QC, or an input that cannot
be listed or stat'ed while planning) gets a `failed` row with the reason of its first failing
stage and the others commit; the flow run then fails with `IngestFailed`, which holds the
per-section outcomes, so `prefect deployment run --watch` and `histmol ingest` both exit non-zero.
A killed run leaves only debris that the next run removes before it starts.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.settings import get_current_settings
from prefect.states import State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.build import (
    SectionFailed,
    place_section,
    read_section,
    section_gene_keys,
    write_section,
    write_section_remote,
)
from histmol.build import (
    SKIP,
    BuildResult,
    SectionRequest,
    section_key,
    skip_decision,
    skipped_result,
)
from histmol.config import BuildConfig
from histmol.errors import ConfigError, HistmolError
from histmol.manifest import IngestPlan, load_manifest
from histmol.remote_inputs import is_url
from histmol.shards.corpus import COMMITTED, Corpus
from histmol.shards.publish import Publisher


class IngestFailed(HistmolError):
    """Some sections failed; `outcomes` holds every section's outcome (the others committed)."""

    def __init__(self, outcomes: list[dict[str, Any]]) -> None:
        self.outcomes = outcomes
        super().__init__(outcomes)

    def __str__(self) -> str:
        failed = [o for o in self.outcomes if o["status"] == "failed"]
        return f"{len(failed)} of {len(self.outcomes)} sections failed: " + "; ".join(
            f"{o['section_id']}: {o['reason']}" for o in failed
        )


Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


@contextmanager
def ingest_events(listener: Listener) -> Iterator[None]:
    """Send this process' ingest events to `listener` while the block runs.

    Events: ("start", {"total", "to_build"}) once, then ("section", outcome dict) per section.
    Flow parameters must be JSON, so a display subscribes here instead (as histmol.progress).
    """
    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(listener)


def _emit(event: str, payload: dict[str, Any]) -> None:
    for listener in list(_listeners):
        listener(event, payload)


@dataclass
class _Run:
    """One section to build: its request, config, skip key and the futures of its task runs."""

    section_id: str
    request: SectionRequest
    config: BuildConfig
    key: str
    problem: str = ""  # why planning this entry failed (it is recorded failed, never built)
    started: float = field(default_factory=time.perf_counter)
    stages: list[PrefectFuture[Any]] = field(default_factory=list)


def _state(future: PrefectFuture[Any]) -> State:
    """The final state of an ended task run (both runners' futures keep it once waited)."""
    future.wait()
    return future.state


def _reason(futures: list[PrefectFuture[Any]]) -> str:
    """Return the error of the first stage that failed (later ones only say 'upstream')."""
    for future in futures:
        state = _state(future)
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            if isinstance(error, SectionFailed):
                return error.reason
            if isinstance(error, BaseException):
                return f"{type(error).__name__}: {error}"
            return state.message or state.name
    return "did not complete"


def _plan_work(plan: IngestPlan, out: str, force: bool, published: set[str] | None = None
               ) -> tuple[list[_Run], list[BuildResult]]:
    """Split the manifest into sections to build and unchanged committed ones (skipped).

    `published`: for a remote corpus, the sections live there (its tables are the truth; a
    section built on a Dask worker has no folder in the scratch corpus `out`). An entry whose
    planning fails (an input that cannot be listed or stat'ed: missing, unreadable, bad URL)
    comes back as a run with its `problem`, to be recorded failed; the others go on.
    """
    corpus = Corpus.open(out, create=True, build_config=plan.corpus_fields)
    corpus.cleanup_staging()  # debris of a killed run: stale staging folders, temporary files
    rows = corpus.statuses()  # one read of the tables for the whole manifest
    todo, skipped = [], []
    for index, (request, config) in enumerate(zip(plan.requests, plan.configs, strict=True)):
        section_id = request.resolved_section_id()
        problem = plan.problems.get(index, "")
        try:
            key = "" if problem else section_key(request, config)
        except HistmolError as err:
            problem = str(err)
        if problem:
            todo.append(_Run(section_id, request, config, "", problem=problem))
            continue
        row = rows.get(section_id)
        live = (section_id in published if published is not None else
                (row or {}).get("status") == COMMITTED)
        if skip_decision(row, key, live=live, force=force) == SKIP:
            assert row is not None
            skipped.append(skipped_result(section_id, request.platform, row))
        else:  # a changed committed section is rebuilt: the manifest says what it should be
            todo.append(_Run(section_id, request, config, key))
    return todo, skipped


def _runner(dask_address: str | None, window: int) -> TaskRunner[Any]:
    if dask_address is None:
        # A section's four task runs are submitted together and the later ones wait for their
        # upstream in a thread that holds no core: 4 per section keeps every section moving.
        return ThreadPoolTaskRunner(max_workers=4 * window)
    _require_api()
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=dask_address)


def _require_api() -> None:
    """Refuse a Dask run without a Prefect API of the user's (a private one is loopback-only)."""
    if not get_current_settings().api.url:
        raise ConfigError(
            "a Dask run needs a Prefect API the workers can reach (Dask worker processes cannot "
            "use this process' private one): start `prefect server start --host <host>` (or "
            "use Prefect Cloud) and set PREFECT_API_URL=http://<host>:4200/api"
        )


def default_parallel(threads: int) -> int:
    """Sections at once on this machine: one per `threads` cores."""
    return max(1, (os.cpu_count() or 1) // max(1, threads))


def _submit(runner: TaskRunner[Any], run: _Run, publisher: Publisher, threads: int) -> None:
    """Submit the section's stage tasks, each given its upstream futures.

    The write is submitted with the others, except for workers that upload (`publisher.upload`):
    it waits for `_advance`, since the remote manifest must drop the section's parts first.
    """
    common = {"section_id": run.section_id, "request": run.request}
    read = runner.submit(read_section, {**common, "config": run.config})
    # the automatic registration overlay goes to the corpus' qc/ (not from a Dask upload:
    # the worker builds in scratch of its own and uploads the figures with the section)
    figures = {} if publisher.upload else {"out": str(publisher.local)}
    place = runner.submit(place_section,
                          {**common, "section": read, "config": run.config, **figures})
    keys = runner.submit(section_gene_keys, {**common, "section": read, "placement": place})
    run.stages = [read, place, keys]
    if not publisher.upload:
        _submit_write(runner, run, publisher, threads)


def _submit_write(runner: TaskRunner[Any], run: _Run, publisher: Publisher, threads: int) -> None:
    read, place, keys = run.stages
    common = {"section_id": run.section_id, "request": run.request, "section": read,
              "placement": place, "keys": keys, "config": run.config, "key": run.key,
              "threads": threads}
    if publisher.upload:
        write = runner.submit(write_section_remote, {**common, "url": publisher.url})
    else:  # force: a committed section reaching here changed; the manifest says rebuild it
        write = runner.submit(write_section,
                              {**common, "out": str(publisher.local), "force": True})
    run.stages.append(write)


def _advance(runner: TaskRunner[Any], run: _Run, publisher: Publisher, threads: int
             ) -> BuildResult | None:
    """The last submitted task run of `run` ended: publish, record the failure, or go on.

    Returns the section's outcome, or None when its write was submitted now (uploads only).
    """
    state = _state(run.stages[-1])
    if not state.is_completed():
        return _failed(run, _reason(run.stages), publisher)
    if len(run.stages) == 3:  # the gene keys of an upload: its old parts go, then its write
        publisher.prepare_write(run.section_id)
        _submit_write(runner, run, publisher, threads)
        return None
    value = state.result()
    if publisher.upload:  # write_section_remote: the outcome and the uploaded section's rows
        keys = run.stages[2].result()
        publisher.committed(run.section_id, value[1], keys.genes, keys.species)
        result: BuildResult = value[0]
    else:
        publisher.committed(run.section_id)
        result = value
    result.seconds = time.perf_counter() - run.started
    return result


def _failed(run: _Run, reason: str, publisher: Publisher) -> BuildResult:
    publisher.failed(run.section_id, run.request.platform, reason, run.config.corpus_fields())
    return BuildResult(run.section_id, run.request.platform, "failed", reason,
                       seconds=time.perf_counter() - run.started)


def _build(runner: TaskRunner[Any], todo: list[_Run], publisher: Publisher, window: int,
           threads: int) -> list[BuildResult]:
    """Run the sections, at most `window` in flight; return their outcomes as they end."""
    outcomes: list[BuildResult] = []

    def add(outcome: BuildResult) -> None:
        outcomes.append(outcome)
        _emit("section", outcome.summary())

    for run in todo:
        if run.problem:
            add(_failed(run, run.problem, publisher))
    waiting = deque(run for run in todo if not run.problem)
    ended: queue.SimpleQueue[_Run] = queue.SimpleQueue()

    def watch(run: _Run) -> None:
        run.stages[-1].add_done_callback(lambda _future: ended.put(run))

    in_flight = 0
    while waiting or in_flight:
        while waiting and in_flight < window:
            run = waiting.popleft()
            run.started = time.perf_counter()
            _submit(runner, run, publisher, threads)
            watch(run)
            in_flight += 1
        run = ended.get()
        outcome = _advance(runner, run, publisher, threads)
        if outcome is None:
            watch(run)
            continue
        in_flight -= 1
        add(outcome)
    return outcomes


def summary_text(outcomes: list[dict[str, Any]]) -> str:
    """Render the outcomes as a plain-text table (for the flow run's log)."""
    lines = [f"{'section':<24} {'platform':<10} {'status':<10} {'pairs':>8} {'units':>9}  reason"]
    for o in outcomes:
        lines.append(f"{o['section_id']:<24} {o['platform']:<10} {o['status']:<10} "
                     f"{o['n_pairs']:>8} {o['n_units']:>9}  {o['reason']}")
    return "\n".join(lines)


@flow(name="ingest-corpus", log_prints=False)
def ingest_corpus(
    manifest: str,
    out: str,
    dask_address: str | None = None,
    max_parallel: int | None = None,
    threads: int = 1,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Build every section of `manifest` into the corpus at `out`; return one outcome per entry.

    `max_parallel` sections run at once (default: the Dask cluster's threads, else one per
    `threads` cores); `threads` tile-reading threads each. `force` rebuilds unchanged sections.
    `out` may be a remote fsspec URL (``s3://bucket/corpus``): its file system takes its options
    (credentials, endpoint) from fsspec's configuration of this process (``FSSPEC_S3_*``
    variables, fsspec config files, or `run_ingest`'s `storage_options`), shipped to Dask
    workers in memory (flows/worker_config.py): never a flow or task parameter, so never in
    Prefect's database.
    Sections are built in a local scratch corpus, or on Dask in each worker's temp dir, and
    published by this process (see the module docstring). Raises IngestFailed (after every
    other section committed) when any section failed.
    """
    plan = load_manifest(manifest)
    window = max_parallel or default_parallel(threads)
    runner = _runner(dask_address, window)  # refuses a Dask run without an API, before any work
    publisher = Publisher.open(out, upload=is_url(out) and dask_address is not None)
    todo, skipped = _plan_work(plan, str(publisher.local), force, publisher.published)
    publisher.initialise()
    _emit("start", {"total": len(plan.requests), "to_build": len(todo)})
    for outcome in skipped:
        _emit("section", outcome.summary())
    with runner:
        if dask_address is not None:
            client = runner.client  # type: ignore[attr-defined]
            if max_parallel is None:
                window = max(1, sum(client.nthreads().values()))
            if publisher.remote is not None:
                from flows.worker_config import ship_fsspec_config

                ship_fsspec_config(client, out)
        built = _build(runner, todo, publisher, window, threads) if todo else []
    publisher.finish()  # the sections' table fragments join the tables once, at the end
    order = {request.resolved_section_id(): i for i, request in enumerate(plan.requests)}
    outcomes = sorted((o.summary() for o in skipped + built), key=lambda o: order[o["section_id"]])
    get_run_logger().info("ingest of %s into %s:\n%s", manifest, out, summary_text(outcomes))
    if any(o["status"] == "failed" for o in outcomes):
        raise IngestFailed(outcomes)
    return outcomes


def _protocol(url: str) -> str:
    import fsspec

    return str(fsspec.core.split_protocol(url)[0])


@contextmanager
def storage_config(out: str, storage_options: dict[str, Any] | None) -> Iterator[None]:
    """Put `storage_options` in fsspec's in-memory config for `out`'s protocol while the block runs.

    fsspec applies its config to every file system of that protocol it creates (this process',
    the loader's, the workers' through flows.worker_config); nothing is written anywhere.
    """
    if not storage_options:
        yield
        return
    import fsspec

    protocol = _protocol(out)
    before = fsspec.config.conf.get(protocol)
    fsspec.config.conf[protocol] = {**(before or {}), **storage_options}
    try:
        yield
    finally:
        if before is None:
            fsspec.config.conf.pop(protocol, None)
        else:
            fsspec.config.conf[protocol] = before


def run_ingest(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dask_address: str | None = None,
    max_parallel: int | None = None,
    threads: int = 1,
    force: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run the `ingest-corpus` flow here: the library and `histmol ingest` entry point.

    Against the user's Prefect API (``PREFECT_API_URL``), else a private server that ends with
    this process (flows/server.py). `storage_options` for a remote `out` reach the file systems
    through fsspec's in-memory config (`storage_config`), never as flow parameters. Returns one
    outcome per entry; raises IngestFailed when any section failed (the others committed).
    """
    from flows.server import prefect_api

    if dask_address is not None:
        _require_api()  # before any server starts or any work
    with storage_config(str(out), storage_options), prefect_api():
        state = ingest_corpus(str(manifest), str(out), dask_address=dask_address,
                              max_parallel=max_parallel, threads=threads, force=force,
                              return_state=True)
        result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result  # type: ignore[no-any-return]
