"""A remote `--out` (s3://, moto's server on 127.0.0.1) built on a 2-worker Dask cluster.

Workers build each section in their own temp dir and upload its objects; the flow process writes
the tables (histmol/shards/remote.py). Inputs given as s3:// URLs are fetched by the workers into
their own cache, never by the flow process (histmol/remote_inputs.py). Slow: a `prefect server`
(Dask runs need a real API) and a cluster of 2 worker processes start here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_ingest import cohort, reference  # noqa: F401 - shared session fixtures
from test_prefect_server import prefect_env  # noqa: F401 - a real Prefect API
from test_remote_ingest import (  # noqa: F401 - fixtures and helpers
    BUCKET,
    crash_before_commit_put,
    endpoint,
    local_tree,
    remote_fragments,
    remote_tree,
)

from histmol.remote_inputs import CACHE_ENV
from histmol.shards.atomic import is_temp_name
from histmol.shards.remote import SCRATCH_DIR, RemoteCorpus, scratch_root

pytestmark = pytest.mark.slow
STATUS = {"syn-a": "committed", "syn-broken": "failed", "syn-st": "committed",
          "syn-b": "committed"}


@pytest.fixture(scope="module")
def cluster(endpoint: str, prefect_env: dict[str, str],  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A LocalCluster of 2 single-thread worker processes with their own temp dir and cache.

    Yields (scheduler address, the workers' temp dir, the workers' $HISTMOL_CACHE_DIR); the
    workers find the S3 server in fsspec's config (`FSSPEC_S3`, as a deployment would set it);
    the flow runs against `prefect_env`'s API.
    """
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings

    worker_tmp = tmp_path_factory.mktemp("worker-tmp")
    worker_cache = tmp_path_factory.mktemp("worker-cache")
    s3 = {"key": "testing", "secret": "testing",
          "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    env = {CACHE_ENV: str(worker_cache), "FSSPEC_S3": json.dumps(s3)}  # worker processes only
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(worker_tmp))  # inherited by the worker processes only
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, env=env) as local_cluster:
            mp.delenv("TMPDIR")
            with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
                yield local_cluster.scheduler_address, worker_tmp, worker_cache


@pytest.fixture
def options(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:  # noqa: F811
    """Storage options of the server, passed explicitly (worker processes get them with a task)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def ingest(manifest: Path, url: str, options: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    """Run the flow; return each section's status (the broken section makes the run fail)."""
    from flows.ingest import IngestFailed, run_ingest

    with pytest.raises(IngestFailed) as failed:
        run_ingest(manifest, url, storage_options=options, **kwargs)
    return {o["section_id"]: o["status"] for o in failed.value.outcomes}


def test_two_workers_publish_the_same_objects_as_an_in_process_remote_ingest(
    cluster: tuple[str, Path, Path], cohort: Path, reference: Path,  # noqa: F811
    options: dict[str, Any],
) -> None:
    address, worker_tmp, _ = cluster
    in_process = f"s3://{BUCKET}/dask-test-in-process"  # moto's store is per process: own names
    assert ingest(cohort, in_process, options, max_parallel=2) == STATUS
    url = f"s3://{BUCKET}/dask-test-2-workers"
    assert ingest(cohort, url, options, dask_address=address) == STATUS
    objects = remote_tree(options, url)
    assert objects == remote_tree(options, in_process) == local_tree(reference)
    assert any(k.startswith("qc/syn-st/") for k in objects)  # figures made on the workers
    # the workers built every section: the flow's scratch corpus holds tables only
    assert sorted(p.name for p in (scratch_root(url) / "shards").iterdir()) == []
    assert sorted(p.name for p in worker_tmp.iterdir() if p.name.startswith("histmol-")) == [
        SCRATCH_DIR]
    assert list((worker_tmp / SCRATCH_DIR).iterdir()) == []  # build folders and their locks gone
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


def test_crash_before_the_commit_put_leaves_a_readable_corpus_then_resumes(
    cluster: tuple[str, Path, Path], cohort: Path, reference: Path,  # noqa: F811
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, _, _ = cluster
    url = f"s3://{BUCKET}/dask-test-crash"
    # the flow process writes the tables: patch it there (workers only put section objects)
    real_put = crash_before_commit_put(monkeypatch, "syn-st")
    from flows.ingest import run_ingest

    with pytest.raises(Exception, match="simulated crash"):
        run_ingest(cohort, url, storage_options=options, dask_address=address, max_parallel=1)
    objects = remote_tree(options, url)
    assert any(k.startswith("shards/syn-st/") for k in objects)  # uploaded, unreferenced
    committed = remote_fragments(objects)  # syn-broken's failed row may be published too
    assert "syn-a" in committed and "syn-st" not in committed
    monkeypatch.setattr(RemoteCorpus, "_put", real_put)
    resumed = ingest(cohort, url, options, dask_address=address)
    assert resumed == {**STATUS, "syn-a": "skipped"}
    assert remote_tree(options, url) == local_tree(reference)


def url_manifest(manifest: Path, options: dict[str, Any], prefix: str, out: Path) -> Path:
    """Upload a manifest's inputs under `prefix`; write it to `out` with every path a URL."""
    fs = fsspec.filesystem("s3", **options)
    data = yaml.safe_load(manifest.read_text())
    for entry in data["sections"]:
        for field in ("bundle", "wsi", "transform"):
            if field in entry:
                source = manifest.parent / entry[field]
                for path in sorted(source.rglob("*")) if source.is_dir() else [source]:
                    if path.is_file():
                        relative = path.relative_to(manifest.parent).as_posix()
                        fs.put_file(str(path), f"{prefix}/{relative}")
                entry[field] = f"s3://{prefix}/{entry[field]}"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_url_inputs_are_fetched_by_the_workers_into_their_own_cache(
    cluster: tuple[str, Path, Path], cohort: Path, reference: Path,  # noqa: F811
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    address, _, worker_cache = cluster
    monkeypatch.setitem(fsspec.config.conf, "s3", options)  # the flow lists inputs with it
    prefix = f"{BUCKET}/dask-inputs"
    manifest = url_manifest(cohort, options, prefix, tmp_path / "urls.yaml")
    flow_inputs = tmp_path / "cache" / "inputs"  # the flow process' input cache ($CACHE_ENV)
    url = f"s3://{BUCKET}/dask-url-inputs"
    assert ingest(manifest, url, options, dask_address=address) == STATUS
    assert not flow_inputs.exists()  # the flow listed the inputs and fetched none
    # every distinct input (3 bundles and the broken one, 2 slides, 2 transforms) fetched once,
    # whole: no temporary folder left by the two workers' concurrent fetches
    fetched = sorted(p.name for p in (worker_cache / "inputs").iterdir())
    assert len(fetched) == 8 and not any(is_temp_name(name) for name in fetched)
    objects = remote_tree(options, url)
    # an in-process ingest of the same manifest fetches into the flow's cache: same bytes
    in_process = f"s3://{BUCKET}/dask-url-inputs-in-process"
    assert ingest(manifest, in_process, options, max_parallel=2) == STATUS
    assert sorted(p.name for p in flow_inputs.iterdir()) == fetched  # the same cache keys
    assert remote_tree(options, in_process) == objects
    # the same as from local paths, but for the inputs' fingerprints (listings, not stat) and
    # the failure's reason, which names the input by its URL, not by a process' local copy
    # (so sections.parquet differs, and commit.json's digest of it)
    local = local_tree(reference)
    differ = ("sections.parquet", "commit.json")
    assert {k: v for k, v in objects.items() if k not in differ} == {
        k: v for k, v in local.items() if k not in differ}
    drop = ["input_fingerprint", "cache_key", "reason"]
    from_urls = pq.read_table(pa.BufferReader(objects["sections.parquet"]))
    from_paths = pq.read_table(pa.BufferReader(local["sections.parquet"]))
    assert from_urls.drop(drop).equals(from_paths.drop(drop))
    reasons = [r.replace(str(cohort.parent.resolve()), f"s3://{prefix}") if r else r
               for r in from_paths.column("reason").to_pylist()]
    assert from_urls.column("reason").to_pylist() == reasons
    assert sum(f"s3://{prefix}/visium-broken/outs/" in (r or "") for r in reasons) == 1
    names = zip(*(from_urls.column(c).to_pylist() for c in ("section_id", "bundle_name",
                                                              "wsi_name")), strict=True)
    assert {n[0]: n[1:] for n in names} == {
        "syn-a": ("outs", "slide.tif"), "syn-broken": (None, None), "syn-st": ("st", "s1.jpg"),
        "syn-b": ("outs", "slide.tif")}
    # a re-run decides from the listings alone: skips, fetches nothing, changes nothing
    for path in sorted(flow_inputs.iterdir()):
        path.rename(tmp_path / path.name)  # out of the flow's sight
    rerun = {"syn-a": "skipped", "syn-broken": "failed", "syn-st": "skipped", "syn-b": "skipped"}
    assert ingest(manifest, url, options, dask_address=address) == rerun
    assert list(flow_inputs.iterdir()) == []
    assert sorted(p.name for p in (worker_cache / "inputs").iterdir()) == fetched
    assert remote_tree(options, url) == objects
