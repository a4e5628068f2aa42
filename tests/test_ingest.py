"""`histmol ingest` end to end on a small generated cohort: failure isolation, resume, caching."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from histmol.cli import app
from histmol.genes import gene_table
from histmol.synth import make_slide, write_st_bundle, write_visium_bundle

runner = CliRunner()
GOOD = ("syn-a", "syn-st", "syn-b")


def make_cohort(root: Path) -> Path:
    """Three small good sections and a broken one; returns the 4-section manifest.

    The ST bundle lists its genes in reverse panel order, so the vocabulary depends on which
    section maps first: byte identity across runners then proves the order is fixed.
    `good.yaml` beside it lists only the good sections.
    """
    slide = make_slide(root / "slides" / "slide.tif", width_um=1400.0, height_um=1200.0, mpp=0.25,
                       seed=3)
    visium_a = write_visium_bundle(root / "visium-a", slide, seed=3, n_genes=60)
    visium_b = write_visium_bundle(root / "visium-b", slide, layout="spaceranger1", matrix="mtx",
                                   seed=5, n_genes=80)
    st = write_st_bundle(root / "st", slide, image_mpp=0.5, seed=4, n_genes=70, sample="s1")
    counts = st.bundle / "s1_stdata.tsv"
    table = pd.read_csv(counts, sep="\t", index_col=0)
    table[table.columns[::-1]].to_csv(counts, sep="\t")
    broken = root / "visium-broken" / "outs"
    shutil.copytree(visium_a.bundle, broken)
    (broken / "filtered_feature_bc_matrix.h5").write_bytes(b"not an HDF5 file")
    entries = [
        {"section_id": "syn-a", "platform": "visium", "bundle": "visium-a/outs",
         "wsi": "slides/slide.tif", "transform": "visium-a/native_to_wsi.csv", "tissue": "colon",
         "patient_id": "p1"},
        {"section_id": "syn-broken", "platform": "visium", "bundle": "visium-broken/outs",
         "wsi": "slides/slide.tif", "transform": "visium-a/native_to_wsi.csv"},
        {"section_id": "syn-st", "platform": "st", "bundle": "st", "wsi": "st/s1.jpg",
         "species": "human", "donor_id": "p2"},
        {"section_id": "syn-b", "platform": "visium", "bundle": "visium-b/outs",
         "wsi": "slides/slide.tif", "transform": "visium-b/native_to_wsi.csv", "licence": "CC0"},
    ]
    assert visium_b.transform_path == root / "visium-b" / "native_to_wsi.csv"
    corpus = {"patch_px": 64, "target_mpp": 0.5}
    manifest = root / "cohort.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "corpus": corpus, "sections": entries},
                                       sort_keys=False))
    good = [e for e in entries if e["section_id"] != "syn-broken"]
    (root / "good.yaml").write_text(yaml.safe_dump({"corpus": corpus, "sections": good}))
    return manifest


def tree(root: Path) -> dict[str, bytes]:
    """Every file under a corpus, relative path -> bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


# what the reference ingest did, seen from its stages and its events (`reference` fills it)
TRACE: dict[str, Any] = {"in_flight": 0, "most_in_flight": 0, "flow_threads": set(),
                         "map_calls": []}


@pytest.fixture(scope="session")
def reference(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort ingested once, uninterrupted, in this process (2 sections at a time).

    Traced (TRACE): a section is in flight from its read to its outcome event; each gene mapping
    notes its thread and whether a Prefect task run holds it.
    """
    from prefect.context import TaskRunContext  # lazily: modules importing make_cohort stay light

    from flows.build import map_stage, read_stage
    from flows.ingest import ingest_events

    out = tmp_path_factory.mktemp("reference") / "corpus"
    lock = threading.Lock()

    def read(request: Any, config: Any) -> Any:
        with lock:
            TRACE["in_flight"] += 1
            TRACE["most_in_flight"] = max(TRACE["most_in_flight"], TRACE["in_flight"])
        return read_stage(request, config)

    def mapped(out: Any, config: Any, keys: Any) -> Any:
        TRACE["map_calls"].append((threading.get_ident(), TaskRunContext.get() is not None))
        return map_stage(out, config, keys)

    def listener(event: str, payload: dict[str, Any]) -> None:
        TRACE["flow_threads"].add(threading.get_ident())  # events come from the flow's thread
        if event == "section":
            with lock:
                TRACE["in_flight"] -= 1

    with pytest.MonkeyPatch.context() as mp, ingest_events(listener):
        mp.setattr("flows.build.read_stage", read)
        mp.setattr("flows.build.map_stage", mapped)
        result = runner.invoke(app, ["ingest", str(cohort), "--out", str(out),
                                     "--max-parallel", "2"])
    assert result.exit_code == 1, result.output
    return out


def test_sections_run_two_at_a_time_and_map_their_genes_in_their_own_tasks(
    reference: Path,
) -> None:
    # four sections, --max-parallel 2: a third read only starts once a section's outcome is out
    assert TRACE["most_in_flight"] == 2 and TRACE["in_flight"] == 0
    # the three good sections (the broken one fails reading) map genes in their write tasks,
    # never in the flow's thread: no order among sections is needed for identical bytes
    assert len(TRACE["map_calls"]) == 3
    assert all(in_task for _, in_task in TRACE["map_calls"])
    assert len(TRACE["flow_threads"]) == 1
    assert not {thread for thread, _ in TRACE["map_calls"]} & TRACE["flow_threads"]


def test_one_broken_section_of_four_is_recorded_and_the_others_commit(
    reference: Path, cohort: Path
) -> None:
    sections = pd.read_parquet(reference / "sections.parquet").set_index("section_id")
    assert sections["status"].to_dict() == {
        "syn-a": "committed", "syn-b": "committed", "syn-broken": "failed", "syn-st": "committed"}
    reason = sections.loc["syn-broken", "reason"]
    assert str(cohort.parent / "visium-broken" / "outs" / "filtered_feature_bc_matrix.h5") in reason
    manifest = pd.read_parquet(reference / "manifest.parquet")
    assert sorted(manifest["section_id"].unique()) == sorted(GOOD)
    assert sorted(p.name for p in (reference / "shards").iterdir()) == sorted(GOOD)
    assert sections.loc["syn-st", "patient_id"] == "p2"
    assert sections.loc["syn-b", "licence"] == "CC0"
    # a gene's index comes from the gene reference, not the manifest order: syn-a's 60, syn-st's
    # 70 (10 unseen) and syn-b's 10 more are 80 genes, each under its resolved index
    genes = pd.read_parquet(reference / "genes.parquet")
    measured = set().union(*(set(p) for p in sections["panel"] if p is not None))
    assert len(measured) == 80 and measured <= set(genes["index"])
    panel = pd.read_csv(cohort.parent / "st" / "s1_stdata.tsv", sep="\t", index_col=0,
                        nrows=1).columns
    assert set(sections.loc["syn-st", "panel"]) == set(gene_table(panel, panel)["index"])


def test_rerun_skips_unchanged_sections_and_rebuilds_a_changed_one(
    reference: Path, cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "corpus"
    shutil.copytree(reference, out)
    transform = cohort.parent / "visium-b" / "native_to_wsi.csv"
    stat = transform.stat()
    os.utime(transform, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        result = runner.invoke(app, ["ingest", str(cohort), "--out", str(out)])
    finally:
        os.utime(transform, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert result.exit_code == 1
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if "syn-" in line}
    assert "skipped" in lines["syn-a"] and "skipped" in lines["syn-st"]
    assert "committed" in lines["syn-b"] and "failed" in lines["syn-broken"]
    before = pd.read_parquet(reference / "sections.parquet").set_index("section_id")
    after = pd.read_parquet(out / "sections.parquet").set_index("section_id")
    assert after.loc["syn-b", "cache_key"] != before.loc["syn-b", "cache_key"]
    assert (out / "genes.parquet").read_bytes() == (reference / "genes.parquet").read_bytes()
    assert tree(out / "shards" / "syn-b") == tree(reference / "shards" / "syn-b")


def test_manifest_error_exits_without_a_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sections:\n  - section_id: a\n    platform: visum\n    bundle: b\n    wsi: w\n")
    result = runner.invoke(app, ["ingest", str(bad), "--out", str(tmp_path / "corpus")])
    assert result.exit_code == 1
    assert f"{bad}:2: sections[0] (a): platform: unknown platform 'visum'" in " ".join(
        result.output.split())
    assert not (tmp_path / "corpus").exists()


def test_dask_without_a_prefect_api_is_refused_before_any_work(
    cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["ingest", str(cohort), "--out", str(out),
                                 "--dask-address", "tcp://127.0.0.1:1"])
    assert result.exit_code == 1
    assert "a Dask run needs a Prefect API the workers can reach" in " ".join(result.output.split())
    assert not out.exists()


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_resumes_to_the_same_bytes(
    reference: Path, cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "corpus"
    command = [sys.executable, "-m", "histmol", "ingest", str(cohort), "--out", str(out),
               "--max-parallel", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    shards = out / "shards"
    deadline = time.monotonic() + 120
    try:
        # one section committed (its folder is only ever renamed into place) and another one
        # half-written in its staging folder: kill the process group there.
        while time.monotonic() < deadline and process.poll() is None:
            names = [p.name for p in shards.iterdir()] if shards.is_dir() else []
            staged = [n for n in names if n.startswith(".staging-") and not n.endswith(".lock")]
            if "syn-a" in names and any(not n.startswith(".staging-syn-a.") for n in staged):
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the ingest ended before it could be killed"
    assert any(p.name.startswith(".staging-") for p in shards.iterdir())
    result = runner.invoke(app, ["ingest", str(cohort), "--out", str(out)])
    assert result.exit_code == 1
    assert "skipped" in next(line for line in result.stdout.splitlines() if "syn-a" in line)
    assert tree(out) == tree(reference)
