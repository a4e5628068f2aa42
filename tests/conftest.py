"""Shared test helpers: the real public fixtures live in ../shared/fixtures beside the repo."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's Prefect database or profiles: PREFECT_HOME is the tests' own,
# set before anything imports prefect (which reads its settings once). It is kept between
# sessions so its database is migrated once per machine, not on every session's first server.
PREFECT_HOME = os.path.join(tempfile.gettempdir(), f"histmol-tests-prefect-{os.getuid()}")
os.makedirs(PREFECT_HOME, exist_ok=True)
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
