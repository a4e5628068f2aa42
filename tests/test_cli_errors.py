"""No traceback reaches a user for an expected failure; --debug / HISTMOL_DEBUG=1 show it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histmol.cli_errors import describe_failure
from histmol.errors import CorpusError

REPO = Path(__file__).resolve().parents[1]

# A tiny app on the same wrapper, whose commands raise what real runs meet.
APP = """
import errno, sys
from histmol.cli_errors import GuardedTyper
from histmol.cli import main_options
from histmol.errors import WSIError
app = GuardedTyper()
app.callback()(main_options)

@app.command()
def boom(kind: str) -> None:
    if kind == "disk":
        raise OSError(errno.ENOSPC, "No space left on device", "/data/corpus/shards/part.zarr")
    if kind == "perm":
        raise PermissionError(errno.EACCES, "Permission denied", "/data/corpus")
    if kind == "server":
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
    if kind == "wsi":
        raise WSIError("slide.svs", "cannot read the file")
    if kind == "interrupt":
        raise KeyboardInterrupt
    raise ValueError("something nobody expected")

app(sys.argv[1:], prog_name="histmol")
"""


def run_app(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    environ.pop("HISTMOL_DEBUG", None) if env is None else None
    return subprocess.run(
        [sys.executable, "-c", APP, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("disk", "error: no space left on the device while writing /data/corpus/shards/part.zarr"),
        ("perm", "error: permission denied: /data/corpus: check its owner and mode"),
        ("server", "error: the local Prefect server did not start in time (a busy machine?)."),
        ("wsi", "error: slide.svs: cannot read the file"),
        ("bug", "error: unexpected ValueError: something nobody expected"),
    ],
)
def test_expected_failures_are_one_or_two_lines(kind: str, expected: str) -> None:
    done = run_app("boom", kind)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(expected) and len(lines) <= 2
    assert "Traceback" not in done.stderr


def test_server_timeout_says_what_to_do() -> None:
    done = run_app("boom", "server")
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180" in done.stderr


def test_interrupt_exits_130_with_a_hint() -> None:
    done = run_app("boom", "interrupt")
    assert done.returncode == 130
    assert done.stderr.strip().startswith("interrupted:") and "Traceback" not in done.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how: str) -> None:
    if how == "flag":
        done = run_app("--debug", "boom", "disk")
    else:
        done = run_app("boom", "disk", env={"HISTMOL_DEBUG": "1"})
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "No space left on device" in done.stderr


def test_describe_failure_finds_the_cause() -> None:
    try:
        try:
            raise CorpusError("corpus/: config clash")
        except CorpusError as inner:
            raise RuntimeError("flow run failed") from inner
    except RuntimeError as outer:
        assert describe_failure(outer) == "corpus/: config clash"
    assert describe_failure(OSError(errno.EROFS, "ro", "/mnt/x")) == (
        "read-only file system: /mnt/x: write somewhere else"
    )
    assert describe_failure(ValueError("x")) is None


def test_real_cli_missing_corpus_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "histmol", "inspect", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert str(tmp_path / "nope") in " ".join(done.stderr.split())
