"""A Dask worker's scratch build folder: removed after use, and after a killed worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from histmol.shards.remote import SCRATCH_DIR, worker_scratch
from histmol.shards.staging import create_staging, lock_path_of, release_staging

KILLED_WORKER = """
import sys, time
from histmol.shards.remote import worker_scratch
with worker_scratch("s-killed") as folder:
    (folder / "corpus").mkdir()
    print(folder, flush=True)
    time.sleep(600)
"""


def test_a_killed_workers_folder_goes_a_live_ones_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    killed = Path(worker.stdout.readline().strip())
    assert (killed / "corpus").is_dir() and killed.parent == tmp_path / SCRATCH_DIR
    worker.send_signal(signal.SIGKILL)  # no cleanup runs
    worker.wait()
    assert killed.exists() and lock_path_of(killed).exists()
    live, fd = create_staging(tmp_path / SCRATCH_DIR, "s-live")  # another worker, still running
    try:
        with worker_scratch("s-next") as folder:
            assert folder.is_dir() and folder.parent == tmp_path / SCRATCH_DIR
            assert not killed.exists() and not lock_path_of(killed).exists()
            assert live.is_dir()
        assert not folder.exists() and not lock_path_of(folder).exists()
    finally:
        live.rmdir()
        release_staging(live, fd)
