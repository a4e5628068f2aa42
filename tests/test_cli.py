"""The CLI wraps library functions: options mirror them, output and exit codes are right."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from conftest import fixture_path
from typer.testing import CliRunner

from histmol.cli import app, build
from histmol.config import BuildConfig
from platform_adapters import PLATFORMS

runner = CliRunner()


def test_build_exposes_every_build_option() -> None:
    cli_options = set(inspect.signature(build).parameters)
    config_fields = {field.name for field in dataclasses.fields(BuildConfig)}
    assert config_fields <= cli_options, config_fields - cli_options


def test_platforms_lists_all_twelve() -> None:
    result = runner.invoke(app, ["platforms", "--json"])
    assert result.exit_code == 0, result.output
    names = [entry["name"] for entry in json.loads(result.stdout)]
    assert names == list(PLATFORMS) and len(names) == 12
    assert {"visium", "visium-hd", "xenium", "st", "stereo-seq", "slide-seq", "cosmx", "merscope",
            "dbit-seq", "seq-scope", "hdst", "open-st"} == set(names)


def test_bad_section_id_fails_cleanly(tmp_path: Path) -> None:
    folder = fixture_path("legacy_st_stutility_MOB1/counts")
    result = runner.invoke(app, ["build", "--platform", "st", "--bundle", str(folder), "--wsi",
                                 str(folder / "MOB1.jpg"), "--out", str(tmp_path / "c"),
                                 "--section-id", "../x"])
    assert result.exit_code == 1
    assert "is not a safe slug" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_unknown_adapter_option_is_named(tmp_path: Path) -> None:
    folder = fixture_path("legacy_st_stutility_MOB1/counts")
    result = runner.invoke(app, ["build", "--platform", "st", "--bundle", str(folder), "--wsi",
                                 str(folder / "MOB1.jpg"), "--out", str(tmp_path / "c"),
                                 "--bin-um", "8"])
    assert result.exit_code == 1
    assert "platform 'st' has no option bin_um" in result.output


@pytest.mark.slow
def test_build_then_inspect_through_prefect(tmp_path: Path) -> None:
    folder = fixture_path("legacy_st_stutility_MOB1/counts")
    out = tmp_path / "corpus"
    args = ["build", "--platform", "st", "--bundle", str(folder), "--wsi", str(folder / "MOB1.jpg"),
            "--out", str(out), "--section-id", "mob1", "--mpp", "4.6", "--target-mpp", "5",
            "--patch-px", "64", "--tissue", "olfactory bulb"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mob1: committed: 379 pairs, 379 units, 1,000 genes" in result.stdout
    again = runner.invoke(app, args)
    assert "mob1: already in the corpus, skipped" in again.stdout
    summary = runner.invoke(app, ["inspect", str(out), "--json"])
    payload = json.loads(summary.stdout)
    assert payload["totals"]["pairs"] == 379 and payload["totals"]["sections"] == 1
    assert payload["genes"] == 1000
    assert payload["sections"][0]["mpp_source"] == "user"
    table = runner.invoke(app, ["inspect", str(out)])
    assert "mob1" in table.stdout and "379" in table.stdout


@pytest.mark.slow
def test_demo_builds_three_sections(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    inspected = runner.invoke(app, ["inspect", str(tmp_path / "demo" / "corpus"), "--json"])
    summary = json.loads(inspected.stdout)
    assert summary["totals"]["sections"] == 3 and summary["totals"]["failed"] == 0
    by_id = {s["section_id"]: s for s in summary["sections"]}
    assert set(by_id) == {"crc-01", "crc-02", "st-breast-01"}
    assert by_id["crc-01"]["mpp_source"] == "embedded"
    assert by_id["st-breast-01"]["mpp_source"] == "estimated_from_pitch"
    assert abs(by_id["st-breast-01"]["mpp"] - 0.5) < 0.005


def test_refused_section_id_prints_its_rule_verbatim(tmp_path: Path) -> None:
    folder = fixture_path("legacy_st_stutility_MOB1/counts")
    result = runner.invoke(app, ["build", "--platform", "st", "--bundle", str(folder), "--wsi",
                                 str(folder / "MOB1.jpg"), "--out", str(tmp_path / "c"),
                                 "--section-id", "B 4"])
    assert result.exit_code == 1
    assert "[a-z0-9][a-z0-9._-]{0,127}" in " ".join(result.output.split())  # not eaten as markup
