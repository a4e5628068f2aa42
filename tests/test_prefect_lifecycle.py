"""The private Prefect server of `histmol ingest`: its start limit, and it dies with its process.

`kill -9` of an ingest must not leave its server (uvicorn) running: the server is a child the
kernel kills with its parent (PR_SET_PDEATHSIG), and the next start removes the dead one's home.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_ingest import make_cohort

from flows.server import HOMES_DIR, TIMEOUT_ENV, private_home, start_server, start_timeout
from histmol.errors import ConfigError


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_start_limit_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert start_timeout() == 300.0
    monkeypatch.setenv(TIMEOUT_ENV, "900")
    assert start_timeout() == 900.0
    for bad in ("soon", "0"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            start_timeout()


def test_a_server_over_the_limit_is_stopped_and_the_error_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "0.2")
    before = set(children(os.getpid()))  # earlier tests may hold Prefect's own in-process server
    with pytest.raises(ConfigError) as error:
        start_server(tmp_path)
    message = str(error.value)
    assert "did not answer within 0.2 s" in message
    assert f"set {TIMEOUT_ENV} to more seconds" in message and "PREFECT_API_URL" in message
    assert set(children(os.getpid())) <= before  # the server it started is gone


@pytest.mark.slow
def test_kill_9_of_an_ingest_takes_its_server_and_the_next_start_removes_its_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = make_cohort(tmp_path / "cohort").with_name("good.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["TMPDIR"] = str(tmp_path)
    ingest = subprocess.Popen([sys.executable, "-m", "histmol", "ingest", str(manifest), "--out",
                               str(tmp_path / "corpus")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    homes = tmp_path / HOMES_DIR
    try:
        deadline = time.monotonic() + 300
        server = None
        while server is None and time.monotonic() < deadline and ingest.poll() is None:
            uvicorn = [pid for pid in children(ingest.pid)
                       if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            server = uvicorn[0] if uvicorn else None
            time.sleep(0.1)
        assert server is not None, "the ingest started no server"
        home = next(p for p in homes.iterdir() if not p.name.endswith(".lock"))
        ingest.send_signal(signal.SIGKILL)
        ingest.wait()
        deadline = time.monotonic() + 10
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(server), "the server outlived the killed ingest"
    finally:
        if ingest.poll() is None:
            os.killpg(ingest.pid, signal.SIGKILL)
            ingest.wait()
    assert home.is_dir()  # nobody cleaned up after kill -9 ...
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    with private_home() as fresh:
        assert not home.exists() and fresh.parent == homes  # ... the next start does
