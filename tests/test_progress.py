"""Counted progress: what library loops report, and what the CLI shows and ends with."""

from __future__ import annotations

from pathlib import Path

import pytest
from qc_corpus import QcCorpus, shared_qc_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.progress import task, track, tracking
from histmol.validate import validate_corpus


def recorded() -> tuple[list[tuple[str, int, int | None, str]], object]:
    events: list[tuple[str, int, int | None, str]] = []
    return events, lambda *event: events.append(event)


def test_track_reports_each_item_and_the_total() -> None:
    events, reporter = recorded()
    with tracking(reporter):
        assert list(track(["a", "b", "c"], "letters", unit="letters")) == ["a", "b", "c"]
    assert events == [("letters", n, 3, "letters") for n in range(4)]


def test_track_weights_batches_and_task_advances() -> None:
    events, reporter = recorded()
    with tracking(reporter):
        batches = iter([[1, 2], [3, 4], [5]])  # no len(): the total is given
        assert sum(len(b) for b in track(batches, "pairs", total=5, weight=len)) == 5
        with task("steps", total=2, unit="steps") as advance:
            advance()
            advance()
    assert [e[1] for e in events if e[0] == "pairs"] == [0, 2, 4, 5]
    assert events[-1] == ("steps", 2, 2, "steps")


def test_nothing_is_reported_without_a_reporter() -> None:
    assert list(track(range(3), "quiet")) == [0, 1, 2]


@pytest.fixture(scope="module")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


def test_validate_reports_every_section(qc: QcCorpus) -> None:
    import pandas as pd

    n_sections = pd.read_parquet(qc.root / "manifest.parquet")["section_id"].nunique()
    events, reporter = recorded()
    with tracking(reporter):
        assert validate_corpus(qc.root) == []
    assert events[0] == ("validate", 0, n_sections, "sections")
    assert events[-1] == ("validate", n_sections, n_sections, "sections")


def test_cli_shows_bars_and_ends_with_where_the_output_went(qc: QcCorpus, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"COLUMNS": "200"}
    result = runner.invoke(app, ["validate", str(qc.root)], env=env)
    assert result.exit_code == 0, result.output
    assert "validate" in result.output and " sections" in result.output
    assert result.stdout.strip().splitlines()[-1].startswith(f"{qc.root}: no problems found (")
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(qc.root), "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "report" in result.output and " sections" in result.output
    assert result.stdout.strip().splitlines()[-1].startswith(f"wrote {out} (")
    result = runner.invoke(
        app,
        [
            "export",
            str(qc.root),
            "--section",
            "crc-01",
            "--format",
            "anndata",
            "--out",
            str(tmp_path / "c.h5ad"),
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "export crc-01" in result.output and "3/3 steps" in result.output
    assert f"exported crc-01 (anndata) to {tmp_path / 'c.h5ad'} (" in result.stdout
