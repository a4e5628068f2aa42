"""Against a real `prefect server` on a loopback port: a Dask cluster run and a served deployment.

Slow (a server, a Dask cluster and a `histmol serve` process start here), so marked `slow`. The
server, its SQLite database (a temporary PREFECT_HOME) and every process are removed afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from test_ingest import GOOD, tree

# test_ingest's session fixtures `cohort` and `reference`, shared as a plugin rather than imported
pytest_plugins = ["test_ingest"]
pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a process group started here: SIGTERM, then SIGKILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A fresh `prefect server` on 127.0.0.1; yields the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    log = (home / "server.log").open("wb")
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"prefect server did not start: see {home}/server.log") from None
                time.sleep(0.5)
        yield env
    finally:
        drain_prefect_services()
        stop(server)
        log.close()


def drain_prefect_services() -> None:
    """Send the logs and events this process queued for the server while it is still up.

    Flows run in the test process queue them for the API in Prefect's background services;
    left queued when the server stops, Prefect's at-exit drain retries them forever and the
    test process never exits.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=60, at_exit=False)


def test_two_worker_dask_cluster_builds_the_same_bytes_as_in_process(
    prefect_env: dict[str, str], cohort: Path, reference: Path, tmp_path: Path
) -> None:
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ingest import IngestFailed, ingest_corpus

    out = tmp_path / "corpus"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, temporary_settings(
            {PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        state = ingest_corpus(str(cohort), str(out), dask_address=cluster.scheduler_address,
                              return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, IngestFailed)
    assert {o["section_id"]: o["status"] for o in error.outcomes} == {
        "syn-a": "committed", "syn-broken": "failed", "syn-st": "committed", "syn-b": "committed"}
    assert tree(out) == tree(reference)


def test_served_deployment_runs_through_prefect_deployment_run(
    prefect_env: dict[str, str], cohort: Path, reference: Path
) -> None:
    # As the README says: `histmol serve`, then `prefect deployment run` with paths relative to
    # where the serve process runs (here the cohort's folder).
    root = cohort.parent
    log = (root / "serve.log").open("wb")
    serve = subprocess.Popen([BIN / "histmol", "serve"], cwd=root, env=prefect_env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([BIN / "prefect", "deployment", "inspect", "ingest-corpus/default"],
                             env=prefect_env, capture_output=True).returncode != 0:
            alive = serve.poll() is None and time.monotonic() < deadline
            assert alive, (root / "serve.log").read_text()
            time.sleep(1)
        run = subprocess.run(
            [BIN / "prefect", "deployment", "run", "ingest-corpus/default", "--param",
             "manifest=good.yaml", "--param", "out=served/", "--watch", "--watch-timeout", "300"],
            env=prefect_env, capture_output=True, text=True, timeout=360,
        )
    finally:
        stop(serve)
        log.close()
    assert run.returncode == 0, run.stdout + run.stderr
    served = pd.read_parquet(root / "served" / "sections.parquet").set_index("section_id")
    expected = pd.read_parquet(reference / "sections.parquet").set_index("section_id")
    expected = expected.loc[list(GOOD)]
    assert served["status"].to_dict() == {s: "committed" for s in GOOD}
    assert served.loc[list(GOOD), "n_pairs"].tolist() == expected["n_pairs"].tolist()
    assert tree(root / "served" / "shards") == {
        k: v for k, v in tree(reference / "shards").items() if k.split("/")[0] in GOOD}
