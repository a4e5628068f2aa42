"""What histmol writes outside --out goes where the README says and can be moved."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from histmol.cli import quiet_prefect


def test_tests_never_use_the_real_prefect_home() -> None:
    home = Path(os.environ["PREFECT_HOME"])
    assert home.is_relative_to(tempfile.gettempdir()) and home != Path.home() / ".prefect"


def test_commands_default_prefect_home_to_histmol_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("HISTMOL_CACHE_DIR", str(tmp_path / "cache"))
    quiet_prefect()
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "cache" / "prefect")
    assert "PREFECT_PROFILES_PATH" not in os.environ  # the user has no profiles to keep


def test_user_profiles_still_apply(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.delenv("HISTMOL_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    profiles = tmp_path / ".prefect" / "profiles.toml"
    profiles.parent.mkdir()
    profiles.write_text('active = "default"\n')
    quiet_prefect()
    assert os.environ["PREFECT_HOME"] == str(tmp_path / ".cache" / "histmol" / "prefect")
    assert os.environ["PREFECT_PROFILES_PATH"] == str(profiles)


def test_an_explicit_prefect_home_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    quiet_prefect()
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "mine")


def test_a_defaulted_prefect_home_still_gives_each_server_its_own_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flows import server

    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("HISTMOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    (tmp_path / "tmp").mkdir()
    quiet_prefect()  # PREFECT_HOME = histmol's state folder, for Prefect's client files
    with server._home() as first, server._home() as second:  # two commands at once
        assert first != second
        assert {first.parent, second.parent} == {tmp_path / "tmp" / server.HOMES_DIR}
    assert not first.exists() and not second.exists()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))  # the user's own: kept
    with server._home() as home:
        assert home == tmp_path / "mine"
