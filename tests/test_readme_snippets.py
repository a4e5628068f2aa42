"""README's "Quality control and interoperability" section runs as written, without histmol.

The shell block is run through the CLI in a folder holding a copy of the test corpus as
``corpus/`` and its slide as ``slide.svs``; each Python block then runs in a fresh interpreter in
that folder (so only what the snippet imports is imported) and its output is checked against
what histmol itself reads.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from qc_corpus import QcCorpus, shared_qc_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.qc.section_data import load_section

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Quality control and interoperability"


def section_blocks(language: str) -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(rf"```{language}\n(.*?)```", text[start:end], flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the README's shell block has run: corpus/, slide.svs, figures, exports."""
    qc: QcCorpus = shared_qc_corpus(tmp_path_factory)
    folder = tmp_path_factory.mktemp("readme")
    qc.copy(folder / "corpus")
    slide = folder / "demo" / "slides" / "slide-a.tif"  # where the README's demo puts its slide
    slide.parent.mkdir(parents=True)
    slide.symlink_to(qc.slide)
    [shell] = section_blocks("bash")
    lines = shell.replace("\\\n", " ").splitlines()
    commands = [line.split("#")[0].strip() for line in lines if line.strip()]
    assert [c.split()[1] for c in commands] == ["qc", "report", "validate", "export", "export"]
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for command in commands:
            result = runner.invoke(app, shlex.split(command)[1:])
            assert result.exit_code == 0, f"{command}\n{result.output}"
    return folder


def run_snippet(code: str, cwd: Path) -> str:
    assert not re.search(r"^\s*(import|from)\s+histmol", code, flags=re.M)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_shell_block_wrote_what_it_says(workdir: Path) -> None:
    assert sorted(p.name for p in (workdir / "corpus" / "qc" / "crc-01").iterdir()) == [
        "genes.png",
        "metrics.png",
        "overview.png",
        "thumbnail.png",
        "zoom.png",
    ]
    assert "data-section='crc-01'" in (workdir / "report.html").read_text()
    assert (workdir / "crc-01.zarr" / "zarr.json").is_file() and (workdir / "crc-01.h5ad").is_file()


def test_there_are_four_python_snippets() -> None:
    assert len(section_blocks("python")) == 4


def test_pandas_snippet(workdir: Path) -> None:
    out = run_snippet(section_blocks("python")[0], workdir)
    assert "123 units in crc-01" in out
    for section_id in ("bad-01", "crc-01", "crc-02", "st-01"):
        assert section_id in out
    section = load_section(workdir / "corpus", "crc-01", counts=True)
    genes = pd.read_parquet(workdir / "corpus" / "genes.parquet")
    first = section.counts[0]
    expected = dict(
        zip(genes["symbol"].to_numpy()[first.indices], first.data.tolist(), strict=True)
    )
    assert out.strip().splitlines()[-1] == f"{section.units['unit_id'][0]} {expected}"


def test_duckdb_snippet(workdir: Path) -> None:
    out = run_snippet(section_blocks("python")[1], workdir)
    per_gene = sum(
        np.asarray(load_section(workdir / "corpus", sid, counts=True).counts.sum(axis=0)).ravel()
        for sid in ("crc-01", "crc-02", "st-01")
    )
    symbols = pd.read_parquet(workdir / "corpus" / "genes.parquet")["symbol"].to_numpy()
    # genes.parquet holds the whole reference: only genes with counts can rank
    top = sorted((-c, s) for c, s in zip(per_gene, symbols, strict=True) if c > 0)[:5]
    rows = re.findall(r"│ (\w+)\s+│\s+(\d+) │", out)
    assert rows == [(symbol, str(-count)) for count, symbol in top]


def test_zarr_xarray_snippet(workdir: Path) -> None:
    out = run_snippet(section_blocks("python")[2], workdir).splitlines()
    assert out[0] == "(123, 224, 224, 3) uint8"
    assert out[1].startswith("{'pair': 123, 'y': 224, 'x': 224, 'channel': 3} ")


def test_spatialdata_anndata_snippet(workdir: Path) -> None:
    out = run_snippet(section_blocks("python")[3], workdir).splitlines()
    assert "'crc-01_units': GeoDataFrame shape: (123, 2) (2D shapes)" in "\n".join(out)
    section = load_section(workdir / "corpus", "crc-01")
    x_um, radius = out[-2].split()
    assert float(x_um) == pytest.approx(section.units["x_um"][0]) and float(radius) == 27.5
    assert out[-1].startswith("(123, 40) {")
