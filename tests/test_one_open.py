"""A section's slide is opened (and, for plain images, decoded) once per build stage at most."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import fixture_path
from typer.testing import CliRunner

import histmol.wsi as wsi
from histmol.cli import app
from histmol.qc.figures import FIGURE_NAMES


@pytest.mark.slow
def test_cli_build_opens_the_slide_once_per_stage(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fixture_path("legacy_st_stutility_MOB1/counts")
    opened: list[str] = []

    class Counting(wsi.PillowReader):
        def __init__(self, path: Path) -> None:
            opened.append(Path(path).name)
            super().__init__(path)

    monkeypatch.setattr(wsi, "PillowReader", Counting)
    result = CliRunner().invoke(app, [
        "build", "--platform", "st", "--bundle", str(folder), "--wsi", str(folder / "MOB1.jpg"),
        "--out", str(tmp_path / "c"), "--mpp", "4.6", "--target-mpp", "5", "--patch-px", "64",
        "--section-id", "MOB1"])
    assert result.exit_code == 0, result.output
    # the register stage (registration, tissue mask, plan) and the write stage (patches, row,
    # QC figures): the figures reuse the write stage's open slide
    assert opened == ["MOB1.jpg", "MOB1.jpg"]
    assert {p.name for p in (tmp_path / "c" / "qc" / "mob1").glob("*.png")} == {
        f"{name}.png" for name in FIGURE_NAMES}
    row = pd.read_parquet(tmp_path / "c" / "sections.parquet").iloc[0]
    assert (row["section_id"], row["section_name"]) == ("mob1", "MOB1")  # as ingest does
