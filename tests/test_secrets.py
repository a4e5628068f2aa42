"""No storage credential in any persisted state of an ingest into a remote corpus.

Canary keys given as `storage_options` must reach the S3 file system (the ingest succeeds
against moto's server) and appear nowhere: not in Prefect's database (flow run parameters), its
server log, this process' logs and output, the remote corpus' objects (tables, corpus.json, QC
figures) or the local scratch cache.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import fsspec
import pytest
import yaml
from test_ingest import make_cohort
from test_remote_ingest import BUCKET, remote_tree

from flows.ingest import run_ingest
from histmol.remote_inputs import CACHE_ENV

pytest_plugins = ["test_remote_ingest"]  # the moto S3 server fixture `endpoint`
pytestmark = pytest.mark.slow
KEY, SECRET = "CANARYKEYa7f3c9d2", "CANARYSECRETe51c2b08"


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_canary_credentials_appear_nowhere(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    home, cache = tmp_path / "prefect-home", tmp_path / "cache"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))  # kept, so its database can be read
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(CACHE_ENV, str(cache))
    manifest = make_cohort(tmp_path / "cohort")
    data = yaml.safe_load(manifest.read_text())
    data["sections"] = [e for e in data["sections"] if e["section_id"] == "syn-st"]
    one = manifest.with_name("one.yaml")
    one.write_text(yaml.safe_dump(data))
    options = {"key": KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    url = f"s3://{BUCKET}/canary"
    caplog.set_level("INFO")  # what a user sees with PREFECT_LOGGING_LEVEL=INFO (botocore's
    outcomes = run_ingest(one, url, storage_options=options)  # DEBUG shows the key id: its own)
    output = capfd.readouterr()
    texts = {"logs": caplog.text, "stdout": output.out, "stderr": output.err}
    assert [o["status"] for o in outcomes] == ["committed"]
    assert "s3" not in fsspec.config.conf or KEY not in str(fsspec.config.conf["s3"])
    with sqlite3.connect(home / "prefect.db") as db:  # the flow run is there, its secrets not
        parameters = [row[0] for row in db.execute("select parameters from flow_run")]
    assert len(parameters) == 1 and str(one) in parameters[0]
    stored = {**files_under(home), **files_under(cache)}
    stored.update({f"{url}/{k}": v for k, v in remote_tree(options, url).items()})
    assert any("/qc/syn-st/" in name for name in stored) and f"{url}/corpus.json" in stored
    for canary in (KEY, SECRET):
        assert [name for name, data in stored.items() if canary.encode() in data] == []
        assert [name for name, text in texts.items() if canary in text] == []
