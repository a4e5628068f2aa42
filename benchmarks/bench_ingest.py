"""Benchmark `ingest-corpus` on the demo manifest: 1 vs 2 workers, in-process and on Dask.

Usage: .venv/bin/python benchmarks/bench_ingest.py [--out FILE] [--remote]
(default --out benchmarks/results/ingest_<time>.json)

Generates the demo inputs (histmol demo's generator) under a temporary folder beside a copy of
manifests/demo.yaml, then times:
- `plain`: `histmol.build.build_section` called serially, no Prefect: the work itself (best of 2);
- `flow_fixed`: an ingest whose sections are all skipped (Prefect flow start + manifest + checks);
- `threads-1`, `threads-2`: in-process ingest with 1 and 2 sections at a time;
- `dask-1`, `dask-2`: a distributed.LocalCluster of 1 and 2 single-thread worker processes,
  against a `prefect server` started here on 127.0.0.1 (Dask runs need a real API).
- with `--remote`, the same into ``s3://`` on a moto S3 server started here on 127.0.0.1 (the
  test suite's server): `remote-threads-N` (built in a local scratch corpus, published by the
  flow) and `remote-dask-N` (built and uploaded by the workers; the flow writes the tables),
  all against the `prefect server`.
Scheduler overhead per task (Prefect + Dask) is estimated from the 1-worker runs, where nothing
overlaps: (wall - flow_fixed - plain) / task runs; its fraction is of the 1-worker wall time;
``coordinator_per_section_s`` is the same overhead per section (planning, task runs, table
updates and publish; docs/scale.md's coordinator cost, see benchmarks/scale_doc.py).
For the remote runs that "overhead" also holds the object-store puts and the table merges.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TASKS_PER_SECTION = 4  # read, place, gene-keys, tile-write (genes mapped, written, committed)


def _ingest(manifest: Path, out: Path | str, **kwargs: Any) -> tuple[float, list[dict[str, Any]]]:
    from flows.ingest import run_ingest

    started = time.perf_counter()
    outcomes = run_ingest(manifest, out, **kwargs)
    return time.perf_counter() - started, outcomes


def _record(name: str, wall: float, outcomes: list[dict[str, Any]], plain: float, fixed: float,
            workers: int) -> dict[str, Any]:
    built = [o for o in outcomes if o["status"] == "committed"]
    units = sum(o["n_units"] for o in built)
    row = {"run": name, "workers": workers, "wall_s": round(wall, 3),
           "sections": len(built), "sections_per_s": round(len(built) / wall, 4),
           "units": units, "units_per_s": round(units / wall, 1),
           "speedup_vs_plain": round(plain / wall, 3)}
    if workers == 1:
        tasks = TASKS_PER_SECTION * len(built)
        overhead = max(wall - fixed - plain, 0.0)
        row.update(task_runs=tasks, overhead_per_task_s=round(overhead / tasks, 4),
                   overhead_fraction=round((overhead + fixed) / wall, 4),
                   per_task_fraction=round(overhead / wall, 4),
                   coordinator_per_section_s=round(overhead / len(built), 4))
    return row


def _remote_runs(manifest: Path, plain: float, fixed: float) -> list[dict[str, Any]]:
    """Run the --remote configurations: moto's S3 server in this process, one prefix per run."""
    import boto3
    from distributed import LocalCluster
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "testing"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    rows = []
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench")
        for workers in (1, 2):
            name = f"remote-threads-{workers}"
            wall, outcomes = _ingest(manifest, f"s3://bench/{name}", max_parallel=workers,
                                     storage_options=options)
            rows.append(_record(name, wall, outcomes, plain, fixed, workers))
        for workers in (1, 2):
            name = f"remote-dask-{workers}"
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              host="127.0.0.1", dashboard_address=None) as cluster:
                cluster.get_client().run(lambda: __import__("flows.build"))
                wall, outcomes = _ingest(manifest, f"s3://bench/{name}", storage_options=options,
                                         dask_address=cluster.scheduler_address)
            rows.append(_record(name, wall, outcomes, plain, fixed, workers))
    finally:
        server.stop()
    return rows


def _start_server(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [Path(sys.executable).parent / "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prefect server did not start") from None
            time.sleep(0.5)


def main() -> None:
    """Run every configuration once and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / f"ingest_{stamp}.json")
    parser.add_argument("--remote", action="store_true",
                        help="also ingest into s3:// on a local moto server (in-process, Dask)")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from histmol.build import build_section
    from histmol.demo import generate_demo_inputs
    from histmol.manifest import load_manifest

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        requests = generate_demo_inputs(work / "demo")
        (work / "manifests").mkdir()
        manifest = work / "manifests" / "demo.yaml"
        shutil.copy(REPO / "manifests" / "demo.yaml", manifest)
        plan = load_manifest(manifest)
        assert [r.section_id for r in plan.requests] == [r.section_id for r in requests]

        plain = float("inf")
        for attempt in range(2):  # the first pays imports and a cold page cache: keep the best
            started = time.perf_counter()
            for request, config in zip(plan.requests, plan.configs, strict=True):
                build_section(request, work / f"plain-{attempt}", config, threads=1)
            plain = min(plain, time.perf_counter() - started)
        shutil.move(work / "plain-1", work / "plain")

        first_flow, _ = _ingest(manifest, work / "plain")  # starts the temporary API too
        fixed, _ = _ingest(manifest, work / "plain")
        rows = []
        for workers in (1, 2):
            wall, outcomes = _ingest(manifest, work / f"threads-{workers}", max_parallel=workers)
            rows.append(_record(f"threads-{workers}", wall, outcomes, plain, fixed, workers))

        server, url = _start_server(work / "prefect-home")
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                dask_fixed, _ = _ingest(manifest, work / "plain")
                for workers in (1, 2):
                    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", dashboard_address=None) as cluster:
                        cluster.get_client().run(lambda: __import__("flows.build"))
                        wall, outcomes = _ingest(manifest, work / f"dask-{workers}",
                                                 dask_address=cluster.scheduler_address)
                    rows.append(_record(f"dask-{workers}", wall, outcomes, plain, dask_fixed,
                                        workers))
                if args.remote:
                    os.environ["HISTMOL_CACHE_DIR"] = str(work / "cache")  # scratch corpora
                    rows += _remote_runs(manifest, plain, dask_fixed)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        report = {
            "benchmark": "ingest of manifests/demo.yaml (3 sections)",
            "machine": f"{os.cpu_count()} cores",
            "plain_build_s": round(plain, 3),
            "first_flow_s (temporary API start)": round(first_flow, 3),
            "flow_fixed_s (all skipped, temporary API)": round(fixed, 3),
            "flow_fixed_s (all skipped, prefect server)": round(dask_fixed, 3),
            "runs": rows,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
