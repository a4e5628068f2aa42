"""`histmol ingest --out s3://...` against a real S3 server (moto's, on 127.0.0.1) through s3fs."""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import fsspec
import pandas as pd
import pytest
import yaml
from moto.server import ThreadedMotoServer
from test_ingest import make_cohort, runner, tree

from histmol.cli import app
from histmol.data import PairDataset
from histmol.remote_inputs import CACHE_ENV
from histmol.shards.commit_record import RECORD
from histmol.shards.remote import RemoteCorpus

BUCKET = "bucket"
SECTIONS = ("syn-a", "syn-st")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port with an empty bucket."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(name, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{port}"
        try:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(
                Bucket=BUCKET)
            yield url
        finally:
            server.stop()


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Storage options of the server; the CLI finds them in fsspec's config (as a user would)."""
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return options


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sections of the ingest cohort (a Visium and an ST one)."""
    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root)
    data = yaml.safe_load((root / "good.yaml").read_text())
    data["sections"] = [e for e in data["sections"] if e["section_id"] in SECTIONS]
    manifest = root / "pair.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifest


@pytest.fixture(scope="module")
def local(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "corpus"
    result = runner.invoke(app, ["ingest", str(cohort), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def remote_tree(options: dict[str, Any], url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url, **options)
    return {key[len(root) + 1:]: fs.cat_file(key) for key in sorted(fs.find(root))}


def local_tree(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(root).items() if k != ".lock"}  # the flock file stays local


def pair_counts(url: str, options: dict[str, Any], cache: Path) -> Counter[str]:
    dataset = PairDataset(url, storage_options=options, cache_dir=cache)
    return Counter(sample["section_id"] for sample in dataset)


def test_remote_ingest_equals_local_ingest_byte_for_byte(
    cohort: Path, local: Path, s3: dict[str, Any], tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/corpus"
    result = runner.invoke(app, ["ingest", str(cohort), "--out", url])
    assert result.exit_code == 0, result.output
    assert remote_tree(s3, url) == local_tree(local)
    expected = pd.read_parquet(local / "sections.parquet").set_index("section_id")["n_pairs"]
    assert set(expected.index) == set(SECTIONS) and expected.min() > 0
    assert pair_counts(url, s3, tmp_path / "read") == Counter(expected.to_dict())
    # a re-run skips both sections and changes no object
    again = runner.invoke(app, ["ingest", str(cohort), "--out", url])
    assert again.exit_code == 0, again.output
    assert sum("skipped" in line for line in again.stdout.splitlines()) == 2
    assert remote_tree(s3, url) == local_tree(local)


def crash_before_commit_put(monkeypatch: pytest.MonkeyPatch, section_id: str) -> Any:
    """Make the put of the commit record that first names `section_id` fail as a crash would.

    That put is the section's commit point (its fragment objects are already uploaded).
    Returns the real `RemoteCorpus._put`, to put back for the resuming run.
    """
    real_put = RemoteCorpus._put

    def crashing_put(self: RemoteCorpus, relative: str, data: bytes) -> None:
        if relative == RECORD and section_id in json.loads(data).get("fragments", {}):
            raise ConnectionError("simulated crash before the commit record put")
        real_put(self, relative, data)

    monkeypatch.setattr(RemoteCorpus, "_put", crashing_put)
    return real_put


def remote_fragments(objects: dict[str, bytes]) -> list[str]:
    """The sections whose fragments the remote commit record names."""
    return sorted(json.loads(objects[RECORD])["fragments"])


def test_crash_before_commit_publish_leaves_a_readable_corpus_then_resumes(
    cohort: Path, local: Path, s3: dict[str, Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"s3://{BUCKET}/crash"
    real_put = crash_before_commit_put(monkeypatch, "syn-st")
    # one section at a time: syn-a (first in the manifest) is published before syn-st
    crashed = runner.invoke(app, ["ingest", str(cohort), "--out", url, "--max-parallel", "1"])
    assert crashed.exit_code != 0
    objects = remote_tree(s3, url)
    assert any(k.startswith("shards/syn-st/") for k in objects)  # parts uploaded, unreferenced
    assert any(k.startswith("fragments/syn-st.") for k in objects)  # rows uploaded, unnamed
    assert remote_fragments(objects) == ["syn-a"]
    sections = pd.read_parquet(local / "sections.parquet").set_index("section_id")
    assert pair_counts(url, s3, tmp_path / "read") == Counter(
        {"syn-a": int(sections.loc["syn-a", "n_pairs"])})

    monkeypatch.setattr(RemoteCorpus, "_put", real_put)
    resumed = runner.invoke(app, ["ingest", str(cohort), "--out", url])
    assert resumed.exit_code == 0, resumed.output
    lines = {line.split()[1]: line for line in resumed.stdout.splitlines() if "syn-" in line}
    assert "skipped" in lines["syn-a"] and "committed" in lines["syn-st"]
    assert remote_tree(s3, url) == local_tree(local)


def test_bundle_and_wsi_urls_are_fetched_once_and_build_the_same_section(
    cohort: Path, local: Path, s3: dict[str, Any], tmp_path: Path
) -> None:
    fs = fsspec.filesystem("s3", **s3)
    bundle = cohort.parent / "st"
    for path in sorted(bundle.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{BUCKET}/inputs/st/{path.relative_to(bundle).as_posix()}")
    data = yaml.safe_load(cohort.read_text())
    [entry] = [e for e in data["sections"] if e["section_id"] == "syn-st"]
    entry.update(bundle=f"s3://{BUCKET}/inputs/st", wsi=f"s3://{BUCKET}/inputs/st/s1.jpg")
    data["sections"] = [entry]
    manifest = tmp_path / "urls.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    # the same section from local paths, alone in its corpus (the vocabulary starts with it)
    local_manifest = cohort.parent / "st-only.yaml"
    data["sections"] = [dict(entry, bundle="st", wsi="st/s1.jpg")]
    local_manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    reference = tmp_path / "reference"
    built = runner.invoke(app, ["ingest", str(local_manifest), "--out", str(reference)])
    assert built.exit_code == 0, built.output
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["ingest", str(manifest), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("genes.parquet", "manifest.parquet"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert tree(out / "shards") == tree(reference / "shards")
    fetched = sorted(p.name for p in (tmp_path / "cache" / "inputs").iterdir())
    assert len(fetched) == 2  # the bundle folder and the slide, one cache folder each
    again = runner.invoke(app, ["ingest", str(manifest), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "skipped" in next(line for line in again.stdout.splitlines() if "syn-st" in line)
    assert sorted(p.name for p in (tmp_path / "cache" / "inputs").iterdir()) == fetched
