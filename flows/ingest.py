"""The `ingest-corpus` flow: every section of a manifest into one corpus, resumably, in parallel.

`ingest_corpus(manifest, out, ...)` loads the manifest (histmol/manifest.py), skips sections whose
skip key (`histmol.build.section_key`: inputs, adapter options, metadata, config, histmol version)
matches their committed row, and runs the stage tasks of the others (flows/build.py around
`histmol.build`'s stages): read -> place -> gene keys -> tile/write + commit. `run_ingest` runs it
from a library call or `histmol ingest`, against a private Prefect server unless PREFECT_API_URL is
set (flows/server.py). The corpus is the cache: it holds each section's key, so deleting or moving
a corpus can never leave a stale Prefect result behind (Prefect's own result cache is off).

Scheduling. Sections run `max_parallel` at a time (a window over the manifest; memory holds at most
that many sections' data). Each section's stages run one after another, so at most `max_parallel`
stages compete for cores. Genes enter the vocabulary in manifest order (the flow maps them as each
section, in order, passes registration), which keeps the corpus byte-identical whatever the runner,
the worker count or the interruption history. Runners: Prefect's thread pool in this process, or an
existing dask.distributed cluster (`dask_address`) through prefect-dask's DaskTaskRunner. Dask
workers are separate processes and cannot reach this process's private Prefect API, so a Dask run
needs a real API (`PREFECT_API_URL`, e.g. `prefect server start`); Prefect hands its URL to the
workers with each task.

Remote corpora (`out` an fsspec URL, histmol/shards/remote.py). This process pulls the remote
tables into a local scratch corpus, where it plans, maps genes and records failures, and is the
single writer of the remote tables. In-process, sections are built in the scratch and published as
each ends. On Dask (workers share no disk), this process drops a rebuilt section's old parts from
the remote manifest before submitting its write; the worker builds the section (parts and QC
figures) in a corpus under its own temp dir, uploads the objects and returns the rows; this process
then puts genes, sections and, last, the manifest. Both give the same objects, byte for byte. Local
input paths must be readable at the same paths on every worker; URL inputs are only listed here
(their listing decides skips) and fetched by the stages that read them, into the cache of the
process running each (a worker's own; histmol/remote_inputs.py), so with a Dask runner this process
downloads no input at all.

Failures are isolated: a section that fails (bad input, adapter error, QC, or an input that cannot
be listed or stat'ed while planning) gets a `failed` row with its reason and the others commit; the
flow run then fails with `IngestFailed`, which holds the per-section outcomes, so `prefect
deployment run --watch` and `histmol ingest` both exit non-zero. A killed run leaves only debris
that the next run removes before it starts.
"""

from __future__ import annotations

import os
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
    map_genes,
    place_section,
    read_section,
    record_failure,
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
from histmol.shards.remote import RemoteCorpus

POLL_S = 0.02


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
    """One section in flight: its request, config and stage futures."""

    index: int
    section_id: str
    request: SectionRequest
    config: BuildConfig
    key: str
    published: bool = False  # remote --out: live in the remote corpus when the run started
    problem: str = ""  # why planning this entry failed (it is recorded failed, never built)
    dropped: bool = False  # remote --out: its parts left the remote manifest (step 1)
    started: float = field(default_factory=time.perf_counter)
    stages: list[PrefectFuture[Any]] = field(default_factory=list)
    write: PrefectFuture[Any] | None = None


def _state(future: PrefectFuture[Any]) -> State:
    """Return the final state of a task run (both runners' wrapped futures return states)."""
    return future.wrapped_future.result()  # type: ignore[attr-defined]


def _done(future: PrefectFuture[Any]) -> bool:
    return bool(future.wrapped_future.done())  # type: ignore[attr-defined]


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
        if problem:  # a live remote section keeps its last good data (as a local one does)
            todo.append(_Run(index, section_id, request, config, "", problem=problem,
                             published=published is not None and section_id in published))
            continue
        row = rows.get(section_id)
        live = (section_id in published if published is not None else
                (row or {}).get("status") == COMMITTED)
        if skip_decision(row, key, live=live, force=force) == SKIP:
            assert row is not None
            skipped.append(skipped_result(section_id, request.platform, row))
        else:  # a changed committed section is rebuilt: the manifest says what it should be
            todo.append(_Run(index, section_id, request, config, key, published=live))
    return todo, skipped


def _runner(dask_address: str | None, window: int) -> TaskRunner[Any]:
    if dask_address is None:
        # Threads blocked on an upstream stage hold no core; 4 per section lets every stage
        # of the window be queued without starving the running ones.
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


class _Scheduler:
    """Feeds the window, maps genes in manifest order, collects outcomes.

    With `remote`, `out` is its scratch corpus and each outcome is published. `upload` (a remote
    corpus on Dask): workers build and upload each section's objects (with the storage options
    of their fsspec config, flows/worker_config.py), and this process only writes the remote
    tables.
    """

    def __init__(self, runner: TaskRunner[Any], out: str, window: int, threads: int,
                 remote: RemoteCorpus | None = None, upload: bool = False) -> None:
        self.runner, self.out, self.window, self.threads = runner, out, window, threads
        self.remote, self.upload = remote, upload
        self.outcomes: list[BuildResult] = []

    def run(self, todo: list[_Run]) -> list[BuildResult]:
        for run in todo:
            if run.problem:
                self._fail(run, run.problem)
        queue = deque(run for run in todo if not run.problem)
        mapping, writing = deque[_Run](), list[_Run]()
        while queue or mapping or writing:
            while queue and len(mapping) + len(writing) < self.window:
                mapping.append(self._start(queue.popleft()))
            if mapping and _done(mapping[0].stages[-1]):
                run = mapping.popleft()
                if self._submit_write(run):
                    writing.append(run)
                continue
            finished = [run for run in writing if _done(run.write)]  # type: ignore[arg-type]
            for run in finished:
                writing.remove(run)
                self._collect(run)
            if not finished:
                time.sleep(POLL_S)
        return self.outcomes

    def _start(self, run: _Run) -> _Run:
        common = {"section_id": run.section_id, "request": run.request}
        read = self.runner.submit(read_section, {**common, "config": run.config})
        # the automatic registration overlay goes to the corpus' qc/ (not from a Dask upload:
        # the worker builds in scratch of its own and uploads the figures with the section)
        figures = {} if self.upload else {"out": self.out}
        place = self.runner.submit(place_section,
                                   {**common, "section": read, "config": run.config, **figures})
        keys = self.runner.submit(section_gene_keys,
                                  {**common, "section": read, "placement": place})
        run.stages = [read, place, keys]
        return run

    def _submit_write(self, run: _Run) -> bool:
        """Map the section's genes (in manifest order) and submit its write; False if it failed."""
        state = _state(run.stages[-1])
        if not state.is_completed():
            self._fail(run, _reason(run.stages))
            return False
        keys = state.result()
        try:
            gene_index = map_genes(self.out, run.config, keys)
        except SectionFailed as err:
            self._fail(run, err.reason)
            return False
        read, place, _ = run.stages
        common = {"section_id": run.section_id, "request": run.request, "section": read,
                  "placement": place, "gene_index": gene_index, "species": keys.species,
                  "config": run.config, "key": run.key, "threads": self.threads}
        if self.upload:
            assert self.remote is not None
            self.remote.drop_section_parts(run.section_id)  # step 1, before a worker overwrites
            run.dropped = True
            # a scratch copy from an in-process run is stale now (and would hide a failure)
            Corpus.open(self.out).remove_section(run.section_id)
            run.write = self.runner.submit(write_section_remote, {**common, "url": self.remote.url})
            return True
        # force: a committed section reaching here changed; the manifest says rebuild it
        run.write = self.runner.submit(write_section, {**common, "out": self.out, "force": True})
        return True

    def _collect(self, run: _Run) -> None:
        assert run.write is not None
        state = _state(run.write)
        if not state.is_completed():
            self._fail(run, _reason([run.write]))
            return
        value = state.result()
        result: BuildResult = value[0] if self.upload else value  # write_section_remote: a pair
        if self.upload:
            assert self.remote is not None
            self.remote.publish_built(value[1])
        elif self.remote is not None:
            self.remote.publish_section(run.section_id)
        result.seconds = time.perf_counter() - run.started
        self._add(result)

    def _fail(self, run: _Run, reason: str) -> None:
        # a live remote section whose parts are still listed keeps its last good data, as a
        # committed local section does (Corpus.record_failure)
        if self.remote is None or not run.published or run.dropped:
            record_failure(self.out, run.config, run.section_id, run.request.platform, reason)
            if self.remote is not None:
                self.remote.publish_failure(run.section_id)
        self._add(BuildResult(run.section_id, run.request.platform, "failed", reason,
                              seconds=time.perf_counter() - run.started))

    def _add(self, outcome: BuildResult) -> None:
        self.outcomes.append(outcome)
        _emit("section", outcome.summary())


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
    remote, local_out, published = None, out, None
    if is_url(out):
        remote = RemoteCorpus(out)
        remote.pull()
        local_out = str(remote.local)
        published = remote.published_sections() if remote.local.is_dir() else set()
    todo, skipped = _plan_work(plan, local_out, force, published)
    if remote is not None:
        remote.initialise()
    _emit("start", {"total": len(plan.requests), "to_build": len(todo)})
    for outcome in skipped:
        _emit("section", outcome.summary())
    with runner:
        if dask_address is not None:
            client = runner.client  # type: ignore[attr-defined]
            if max_parallel is None:
                window = max(1, sum(client.nthreads().values()))
            if remote is not None:
                from flows.worker_config import ship_fsspec_config

                ship_fsspec_config(client, out)
        scheduler = _Scheduler(runner, local_out, window, threads, remote,
                               upload=remote is not None and dask_address is not None)
        built = scheduler.run(todo) if todo else []
    Corpus.open(local_out).compact()  # the sections' fragments join the tables once, at the end
    if remote is not None:
        remote.compact()
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
