"""A remote `--out` (s3://, moto's server on 127.0.0.1) built on a 2-worker Dask cluster.

Workers build each section in their own temp dir and upload its objects; the flow process writes
the tables (histmol/shards/remote.py). Slow: a `prefect server` (Dask runs need a real API) and
a cluster of 2 worker processes start here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_ingest import cohort, reference  # noqa: F401 - shared session fixtures
from test_prefect_server import prefect_env  # noqa: F401 - a real Prefect API
from test_remote_ingest import BUCKET, endpoint, local_tree, remote_tree  # noqa: F401

from histmol.remote_inputs import CACHE_ENV
from histmol.shards.remote import RemoteCorpus, scratch_root

pytestmark = pytest.mark.slow
STATUS = {"syn-a": "committed", "syn-broken": "failed", "syn-st": "committed",
          "syn-b": "committed"}


@pytest.fixture(scope="module")
def cluster(endpoint: str, prefect_env: dict[str, str],  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A LocalCluster of 2 single-thread worker processes whose temp dir is a fresh folder.

    Yields (scheduler address, the workers' temp dir); the flow runs against `prefect_env`'s API.
    """
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings

    worker_tmp = tmp_path_factory.mktemp("worker-tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(worker_tmp))  # inherited by the worker processes only
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as local_cluster:
            mp.delenv("TMPDIR")
            with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
                yield local_cluster.scheduler_address, worker_tmp


@pytest.fixture
def options(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:  # noqa: F811
    """Storage options of the server, passed explicitly (worker processes get them with a task)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def ingest(manifest: Path, url: str, options: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    """Run the flow; return each section's status (the broken section makes the run fail)."""
    from flows.ingest import IngestFailed, ingest_corpus

    state = ingest_corpus(str(manifest), url, storage_options=options, return_state=True,
                          **kwargs)
    result = state.result(raise_on_failure=False)
    assert isinstance(result, IngestFailed), result
    return {o["section_id"]: o["status"] for o in result.outcomes}


def test_two_workers_publish_the_same_objects_as_an_in_process_remote_ingest(
    cluster: tuple[str, Path], cohort: Path, reference: Path,  # noqa: F811
    options: dict[str, Any],
) -> None:
    address, worker_tmp = cluster
    in_process = f"s3://{BUCKET}/dask-test-in-process"  # moto's store is per process: own names
    assert ingest(cohort, in_process, options, max_parallel=2) == STATUS
    url = f"s3://{BUCKET}/dask-test-2-workers"
    assert ingest(cohort, url, options, dask_address=address) == STATUS
    objects = remote_tree(options, url)
    assert objects == remote_tree(options, in_process) == local_tree(reference)
    assert any(k.startswith("qc/syn-st/") for k in objects)  # figures made on the workers
    # the workers built every section: the flow's scratch corpus holds tables only
    assert sorted(p.name for p in (scratch_root(url) / "shards").iterdir()) == []
    assert sorted(p.name for p in worker_tmp.iterdir() if p.name.startswith("histmol-")) == []
    # a re-run skips the three live sections (no scratch folders needed) and changes nothing
    rerun = {"syn-a": "skipped", "syn-broken": "failed", "syn-st": "skipped", "syn-b": "skipped"}
    assert ingest(cohort, url, options, dask_address=address) == rerun
    assert remote_tree(options, url) == objects
    # a live section whose new inputs fail before its write keeps its last good data
    data = yaml.safe_load(cohort.read_text())
    data["sections"][0]["bundle"] = "visium-broken/outs"
    changed = cohort.parent / "syn-a-broken.yaml"
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    assert ingest(changed, url, options, dask_address=address) == {**rerun, "syn-a": "failed"}
    assert remote_tree(options, url) == objects


def test_crash_before_the_manifest_put_leaves_a_readable_corpus_then_resumes(
    cluster: tuple[str, Path], cohort: Path, reference: Path,  # noqa: F811
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, _ = cluster
    url = f"s3://{BUCKET}/dask-test-crash"
    real_put = RemoteCorpus._put

    def crashing_put(self: RemoteCorpus, relative: str, data: bytes) -> None:
        if relative == "manifest.parquet" and "syn-st" in pq.read_table(
                pa.BufferReader(data)).column("section_id").to_pylist():
            raise ConnectionError("simulated crash before the manifest put")
        real_put(self, relative, data)

    # the flow process writes the tables: patch it there (workers only put section objects)
    monkeypatch.setattr(RemoteCorpus, "_put", crashing_put)
    from flows.ingest import ingest_corpus

    state = ingest_corpus(str(cohort), url, storage_options=options, dask_address=address,
                          max_parallel=1, return_state=True)
    assert "simulated crash" in str(state.result(raise_on_failure=False))
    objects = remote_tree(options, url)
    assert any(k.startswith("shards/syn-st/") for k in objects)  # uploaded, unreferenced
    manifest = pq.read_table(pa.BufferReader(objects["manifest.parquet"]))
    assert sorted(set(manifest.column("section_id").to_pylist())) == ["syn-a"]
    monkeypatch.setattr(RemoteCorpus, "_put", real_put)
    resumed = ingest(cohort, url, options, dask_address=address)
    assert resumed == {**STATUS, "syn-a": "skipped"}
    assert remote_tree(options, url) == local_tree(reference)
