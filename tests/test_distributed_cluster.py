"""An ingest on a Dask cluster of separate `dask worker` processes, as on a real cluster.

The scheduler and two workers are started with Dask's own command line (what dask-jobqueue and
the Dask Kubernetes operator run on their nodes), each worker with its own scratch (TMPDIR) and
its own histmol cache (HISTMOL_CACHE_DIR); the flow runs in this process against a real
`prefect server` and reaches the cluster only through its scheduler address. The corpus must be
byte-identical to an in-process (local) build of the same manifest against the same server.
Slow: a server, a scheduler and two workers start here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ingest import cohort, tree  # noqa: F401 - shared session fixtures
from test_prefect_server import free_port, prefect_env, stop  # noqa: F401 - a real Prefect API

from histmol.remote_inputs import CACHE_ENV

pytestmark = pytest.mark.slow
STATUS = {"syn-a": "committed", "syn-broken": "failed", "syn-st": "committed",
          "syn-b": "committed"}


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, list[Path]]]:
    """`dask scheduler` + 2 `dask worker` processes; yields the address and the workers' homes."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    python = [sys.executable, "-m"]
    processes = [subprocess.Popen(
        [*python, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", ":0"], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "scheduler.log").open("wb"))]
    homes = []
    for i in range(2):
        home = tmp_path / f"worker-{i}"
        (home / "tmp").mkdir(parents=True)
        (home / "cache").mkdir()
        homes.append(home)
        processes.append(subprocess.Popen(
            [*python, "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads",
             "1", "--name", f"w{i}", "--local-directory", str(home / "dask"),
             "--dashboard-address", ":0"],
            env={**env, "TMPDIR": str(home / "tmp"), CACHE_ENV: str(home / "cache")},
            start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=(home / "worker.log").open("wb")))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dask cluster did not start: see {tmp_path}/*.log") \
                        from None
                time.sleep(0.5)
        yield address, homes
    finally:
        for process in reversed(processes):
            stop(process)


def test_separate_worker_processes_build_the_same_bytes_as_a_local_build(
    prefect_env: dict[str, str], cohort: Path,  # noqa: F811
    dask_cluster: tuple[str, list[Path]], tmp_path: Path,
) -> None:
    from distributed import Client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ingest import IngestFailed, ingest_corpus

    address, homes = dask_cluster
    with Client(address) as client:  # stdlib functions: the workers cannot import this module
        pids = client.run(os.getpid)
        temps, caches = client.run(tempfile.gettempdir), client.run(os.getenv, CACHE_ENV)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert sorted(zip(temps.values(), (caches[w] for w in temps), strict=True)) == [
        (str(h / "tmp"), str(h / "cache")) for h in homes]

    out, reference = tmp_path / "corpus", tmp_path / "local"
    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        states = [ingest_corpus(str(cohort), str(reference), max_parallel=2, return_state=True),
                  ingest_corpus(str(cohort), str(out), dask_address=address, return_state=True)]
    for state in states:
        error = state.result(raise_on_failure=False)
        assert isinstance(error, IngestFailed)  # syn-broken fails by design; the others commit
        assert {o["section_id"]: o["status"] for o in error.outcomes} == STATUS
    built, local = tree(out), tree(reference)
    assert any(k.endswith(".parquet") and "/syn-b/" in k for k in local)
    assert sorted(k for k in built.keys() | local.keys() if built.get(k) != local.get(k)) == []
    for home in homes:  # the workers left no scratch behind in their own temp folders
        leftovers = [p for p in (home / "tmp").rglob("*") if p.is_file()]
        assert leftovers == [], leftovers
