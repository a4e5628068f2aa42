"""Shared test helpers: the real public fixtures live in ../shared/fixtures beside the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


def fixture_path(relative: str) -> Path:
    """Path of a real public fixture; skips the calling test, naming the path, when absent."""
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"real fixture {path} is absent (../shared/fixtures is not beside the repo)")
    return path
