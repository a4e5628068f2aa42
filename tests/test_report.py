"""The corpus report: self-contained HTML, checked as text and as a page in headless Chromium."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from qc_corpus import QcCorpus, shared_figures, shared_qc_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.qc.report import write_report
from histmol.shards.atomic import atomic_write_parquet
from histmol.shards.corpus_tables import sections_table

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
WINDOW = (1280, 2000)
ROW = re.compile(r"<tr class=['\"]?([a-z]*)['\"]? data-section=['\"]([^'\"]+)['\"]>")


@pytest.fixture(scope="session")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_figures(tmp_path_factory)  # crc-01 and st-01 only


@pytest.fixture(scope="session")
def report(qc: QcCorpus, figures: Path) -> Path:
    """A report beside its figures folder; crc-02 deliberately has no figures."""
    return write_report(qc.root, figures.parent / "report.html", figures_dir=figures)


def test_page_is_self_contained_and_links_to_existing_figures(report: Path, figures: Path) -> None:
    page = report.read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page
    sources = re.findall(r"<img[^>]* src='([^']+)'", page)
    assert len(sources) == 2 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    links = re.findall(r"<a href='([^']+)'>", page)
    assert sorted(set(links)) == sorted(
        f"{figures.name}/{sid}/{name}.png"
        for sid in ("crc-01", "st-01")
        for name in ("overview", "zoom", "metrics", "genes")
    )
    assert all((report.parent / link).is_file() for link in links)


def test_page_content(report: Path) -> None:
    page = report.read_text()
    rows = dict((sid, cls) for cls, sid in ROW.findall(page))
    assert rows == {"bad-01": "failed", "crc-01": "", "crc-02": "", "st-01": "flagged"}
    assert "too coarse for 0.5 um/px patches" in page  # the failure reason is shown
    assert "mpp estimated from pitch" in page  # st-01's QC flag
    # totals: 3 committed sections, 123 + 114 + 26 units, 1 failed
    assert re.search(r"<td>committed sections</td><td class=num>3</td>", page)
    assert re.search(r"<td>units</td><td class=num>263</td>", page)
    assert re.search(r"<td>failed sections</td><td class=num>1</td>", page)
    # per platform: visium 2 sections, 123 + 86 pairs; st 1 committed + 1 failed
    assert re.search(r"<td>visium</td><td class=num>2</td><td class=num>209</td>", page)
    assert re.search(
        r"<td>st</td><td class=num>1</td><td class=num>26</td><td class=num>26</td>"
        r"<td class=num>1</td>",
        page,
    )
    # gene panels: visium measures 40 genes, st 30 of them
    assert re.search(r"<td>every section</td><td class=num>30</td>", page)
    assert re.search(
        r"<td>st</td><td class=num>30</td><td class=num>30</td></tr><tr><td>visium"
        r"</td><td class=num>30</td><td class=num>40</td>",
        page,
    )
    assert "crc-02</td>" in page and "no figures" in page


def test_text_from_the_corpus_is_escaped(qc: QcCorpus, tmp_path: Path) -> None:
    root = qc.copy(tmp_path / "corpus")
    records = pq.read_table(root / "sections.parquet").to_pylist()
    records[1]["tissue"] = "<script>alert(1)</script>"
    atomic_write_parquet(root / "sections.parquet", sections_table(records))
    page = write_report(root, tmp_path / "r.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package to render the report")
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_chromium_runs_the_page_sorted_from_the_url(report: Path, tmp_path: Path) -> None:
    dom = run_chromium(tmp_path, "--dump-dom", f"{report.as_uri()}#sort=n_units:desc").stdout
    assert [sid for _, sid in ROW.findall(dom)] == ["crc-01", "crc-02", "st-01", "bad-01"]
    assert re.search(r"data-sort=\"n_units:desc\"", dom)
    assert re.search(r"<th data-key=\"n_units\" data-numeric=\"1\" aria-sort=\"descending\">", dom)
    images = re.search(r"<body data-images-loaded=\"(\d+)\" data-images=\"(\d+)\">", dom)
    assert images is not None and images.groups() == ("2", "2")  # both thumbnails decoded
    by_name = run_chromium(tmp_path, "--dump-dom", f"{report.as_uri()}#sort=section_id:asc").stdout
    assert [sid for _, sid in ROW.findall(by_name)] == ["bad-01", "crc-01", "crc-02", "st-01"]


def test_chromium_screenshot(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run_chromium(
        tmp_path, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", report.as_uri()
    )
    with Image.open(shot) as image:
        assert image.size == WINDOW
        rgb = np.asarray(image.convert("RGB")).astype(int)
    saturated = (rgb.max(axis=2) - rgb.min(axis=2)) > 60  # H&E pinks and purples, not text
    assert saturated.mean() > 0.005  # the thumbnails are drawn


def test_cli_report(qc: QcCorpus, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(qc.root), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().count("data-section=") == 4
