"""One name per concept: `histmol platforms` and the README agree; mpp sources are named alike."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
from qc_corpus import QcCorpus, shared_qc_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.qc.report import write_report
from histmol.section import MppSource
from platform_adapters import PLATFORMS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_platform_rows() -> dict[str, str]:
    """platform -> its 'default units (tiling)' cell, from the README's platform table."""
    section = README[README.index("## Platforms") :]
    header = "| platform | default units (tiling) |"
    assert header in section
    rows = re.findall(r"^\| `([a-z-]+)` \| ([^|]+) \|", section, flags=re.M)
    return {name: cell.strip() for name, cell in rows}


def test_readme_table_lists_every_platform_in_registry_order() -> None:
    assert list(readme_platform_rows()) == list(PLATFORMS)


@pytest.mark.parametrize("name", list(PLATFORMS))
def test_readme_default_units_are_the_registry_s(name: str) -> None:
    spec, cell = PLATFORMS[name], readme_platform_rows()[name]
    assert cell.startswith(spec.default_units), (cell, spec.default_units)
    assert f"({spec.default_mode})" in cell


def test_platforms_command_prints_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    result = CliRunner().invoke(app, ["platforms"])
    assert result.exit_code == 0, result.output
    for spec in PLATFORMS.values():
        line = next(row for row in result.output.splitlines() if f" {spec.name} " in row)
        assert f"{spec.default_units} ({spec.default_mode})" in line
    assert "square 8 um" not in result.output  # the old, wrong, per-shape column


def test_readme_names_every_mpp_source() -> None:
    for source in get_args(MppSource):
        assert f"`{source}`" in README


@pytest.fixture(scope="module")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


def test_inspect_and_report_name_mpp_sources_as_stored(qc: QcCorpus, tmp_path: Path) -> None:
    import pandas as pd

    stored = set(pd.read_parquet(qc.root / "sections.parquet")["mpp_source"].dropna())
    assert stored and stored <= set(get_args(MppSource))
    result = CliRunner().invoke(app, ["inspect", str(qc.root)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    html = write_report(qc.root, tmp_path / "r.html").read_text()
    for source in stored:
        assert f"({source})" in result.output and f"({source})</td>" in html
    for old in ("(file)", "(pitch)", "(bundle)"):
        assert old not in result.output and old not in html


COMMANDS = [  # every command of the app
    "build",
    "inspect",
    "platforms",
    "demo",
    "version",
    "qc",
    "report",
    "validate",
    "export",
    "ingest",
    "serve",
    "train",
    "embed",
    "eval",
    "compact",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_written_for_users(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"Example: histmol {command}" in text
    for internal in ("STYLE.md", "DESIGN.md", "rule 5"):
        assert internal not in text
    # defaults are shown one way, by typer ("[default: ...]"), never as a bare "[0.5]"
    assert not re.search(r"\[\d[\d.]*\]", text)
