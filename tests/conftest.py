"""Shared test helpers: the real public fixtures live in ../shared/fixtures beside the repo."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's Prefect database or profiles: one throw-away PREFECT_HOME per
# session, set before anything imports prefect (which reads its settings once).
PREFECT_HOME = tempfile.mkdtemp(prefix="histmol-tests-prefect-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ.pop("PREFECT_PROFILES_PATH", None)
# A fresh home migrates its database on the first server start: slow on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


def fixture_path(relative: str) -> Path:
    """Path of a real public fixture; skips the calling test, naming the path, when absent."""
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"real fixture {path} is absent (../shared/fixtures is not beside the repo)")
    return path


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's Prefect home."""
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)
