"""One definition of a section build: one skip key, the same bytes from every entry point.

`histmol build` (no Prefect), `histmol.build.build_section` and the ingest flow (Prefect tasks
around the same stages) run one pipeline; the skip key covers adapter options, so a rebuild at
another bin size is refused (or rebuilt with --force), never skipped. Ingest tests run against
one Prefect server started here for the module (flows/server.py), whose database they read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_ingest import make_cohort, tree
from typer.testing import CliRunner

from histmol.build import SectionRequest, build_section, section_key
from histmol.cli import app
from histmol.config import BuildConfig
from histmol.synth import make_slide
from histmol.synth.visium_hd import write_visium_hd_bundle

runner = CliRunner()
SMALL = ["--patch-px", "32", "--target-mpp", "2"]
CONFIG = BuildConfig(patch_px=32, target_mpp=2.0)


@pytest.fixture(scope="module")
def hd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600 um Visium HD bundle with 8 and 16 um bins (no images: the slide is the H&E)."""
    root = tmp_path_factory.mktemp("hd")
    slide = make_slide(root / "slide.tif", width_um=600.0, height_um=600.0, mpp=0.5, seed=2)
    write_visium_hd_bundle(root / "hd", slide, bin_sizes=(8, 16), n_genes=30, chunk_rows=16,
                           images=False)
    return root


def hd_build(root: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--platform", "visium-hd", "--bundle", str(root / "hd" / "outs"), "--wsi",
            str(root / "slide.tif"), "--out", str(out), "--section-id", "hd", *SMALL, *extra]


def units(out: Path) -> int:
    return int(pd.read_parquet(out / "sections.parquet").set_index("section_id").at["hd",
                                                                                  "n_units"])


def test_another_bin_size_is_refused_then_rebuilt_with_force_never_skipped(
    hd: Path, tmp_path: Path
) -> None:
    out = tmp_path / "corpus"
    first = runner.invoke(app, hd_build(hd, out, "--bin-um", "8"))
    assert first.exit_code == 0, first.output
    assert "hd: committed: 48 pairs, 2,625 units" in first.stdout
    before = tree(out)
    assert (out / "qc" / "hd").is_dir()  # QC figures on the plain path too
    refused = runner.invoke(app, hd_build(hd, out, "--bin-um", "16"))
    assert refused.exit_code == 1
    assert "already in the corpus, built from other inputs, adapter options" in " ".join(
        refused.output.split())
    assert "pass --force" in refused.output and "skipped" not in refused.output
    assert tree(out) == before and units(out) == 2625
    forced = runner.invoke(app, hd_build(hd, out, "--bin-um", "16", "--force"))
    assert forced.exit_code == 0, forced.output
    assert "hd: committed: 48 pairs, 663 units" in forced.stdout and units(out) == 663
    again = runner.invoke(app, hd_build(hd, out, "--bin-um", "16"))
    assert "hd: already in the corpus, skipped" in again.stdout


def test_the_skip_key_covers_options_metadata_config_and_option_files(
    hd: Path, tmp_path: Path
) -> None:
    alignment = tmp_path / "alignment.csv"
    alignment.write_text("1,0,0\n0,1,0\n0,0,1\n")
    base = SectionRequest("visium-hd", hd / "hd" / "outs", hd / "slide.tif", "hd",
                          options={"bin_um": 8, "alignment": str(alignment)})
    key = section_key(base, CONFIG)
    assert section_key(base, CONFIG) == key
    variants = [
        SectionRequest("visium-hd", base.bundle, base.wsi, "hd",
                       options={"bin_um": 16, "alignment": str(alignment)}),
        SectionRequest("visium-hd", base.bundle, base.wsi, "hd", metadata={"tissue": "brain"},
                       options=base.options),
    ]
    keys = {section_key(v, CONFIG) for v in variants} | {
        section_key(base, CONFIG.with_overrides(min_tissue_fraction=0.2))}
    assert len(keys) == 3 and key not in keys
    alignment.write_text("1,0,0\n0,1,0\n0,0,1\n\n")  # an option file changes: its stat does
    assert section_key(base, CONFIG) != key


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Prefect server for the module's ingests; yields its PREFECT_HOME (database inside)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import start_server, stop_server

    home = tmp_path_factory.mktemp("prefect-home")
    server, url = start_server(home)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield home
    finally:
        from flows.server import _drain_services

        _drain_services()
        stop_server(server)


@pytest.mark.slow
def test_cli_library_and_flow_write_the_same_bytes(hd: Path, api: Path, tmp_path: Path) -> None:
    request = SectionRequest("visium-hd", hd / "hd" / "outs", hd / "slide.tif", "hd",
                             options={"bin_um": 16})
    library = tmp_path / "library"
    assert build_section(request, library, CONFIG).status == "committed"
    cli = tmp_path / "cli"
    assert runner.invoke(app, hd_build(hd, cli, "--bin-um", "16")).exit_code == 0
    manifest = tmp_path / "one.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "corpus": {"patch_px": 32,
                                                                  "target_mpp": 2.0},
                                        "sections": [{"section_id": "hd",
                                                      "platform": "visium-hd",
                                                      "bundle": str(request.bundle),
                                                      "wsi": str(request.wsi), "bin_um": 16}]}))
    flow = tmp_path / "flow"
    result = runner.invoke(app, ["ingest", str(manifest), "--out", str(flow)])
    assert result.exit_code == 0, result.output
    reference = tree(library)
    assert any(name.startswith("qc/hd/") for name in reference)
    assert tree(cli) == reference
    assert tree(flow) == reference
    # and each path skips what another one built
    again = runner.invoke(app, ["ingest", str(manifest), "--out", str(library)])
    assert "skipped" in again.stdout and tree(library) == reference


@pytest.mark.slow
def test_planning_errors_fail_their_entry_and_the_others_build(
    api: Path, tmp_path: Path
) -> None:
    cohort = make_cohort(tmp_path / "cohort")
    data = yaml.safe_load(cohort.read_text())
    good = [e for e in data["sections"] if e["section_id"] != "syn-broken"]
    no_wsi = {**good[0], "section_id": "syn-no-wsi", "wsi": "slides/missing.tif"}
    no_transform = {**good[0], "section_id": "syn-no-transform",
                    "transform": "visium-a/missing.csv"}
    data["sections"] = [good[0], no_wsi, good[1], no_transform, good[2]]
    manifest = cohort.with_name("five.yaml")
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["ingest", str(manifest), "--out", str(out)])
    assert result.exit_code == 1, result.output
    sections = pd.read_parquet(out / "sections.parquet").set_index("section_id")
    assert sections["status"].to_dict() == {
        "syn-a": "committed", "syn-no-wsi": "failed", "syn-st": "committed",
        "syn-no-transform": "failed", "syn-b": "committed"}
    root = manifest.parent
    assert sections.at["syn-no-wsi", "reason"] == (
        f"{root / 'slides' / 'missing.tif'}: cannot read input: No such file or directory")
    assert sections.at["syn-no-transform", "reason"] == (
        f"{root / 'visium-a' / 'missing.csv'}: cannot read input: No such file or directory")
    statuses = [word for line in result.stdout.splitlines() for word in line.split()
                if word in ("committed", "failed")]  # the summary table, one status per entry
    assert statuses == ["committed", "failed", "committed", "failed", "committed"]

