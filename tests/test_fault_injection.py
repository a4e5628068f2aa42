"""kill -9 of an ingest at random moments and at exact points; every re-run must heal the corpus.

Each trial kills `fault_driver.py` (the ingest's stages as plain functions: read, register,
tissue, plan, write parts, commit, QC figures) either after a random delay or at the N-th call
of a function (a step of a table write, a rename of the commit, a part, a figure), re-runs it
to the end, then checks that `validate_corpus` finds nothing and that every file is
byte-identical to an uninterrupted ingest. Trials on a ``--force`` rebuild (with changed tissue
options) run a reader next to the killed run: every open of the corpus must succeed and see the
old or the new state. Two ingests into one corpus at once must end in the same bytes.
The seed is fixed; ``HISTMOL_FAULT_TRIALS`` sets the number of random-delay trials.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from histmol.synth import make_slide, write_st_bundle, write_visium_bundle
from histmol.validate import validate_corpus

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
DRIVER = HERE / "fault_driver.py"
N_RANDOM = int(os.environ.get("HISTMOL_FAULT_TRIALS", "3"))
EXACT = [  # (where, what the kill interrupts)
    ("histmol.build:read_stage:3", "reading the third section"),
    ("histmol.shards.shard_writer:encode_patch:7", "writing parts"),
    ("histmol.qc.figures:_save:2", "drawing QC figures"),
    # the first section's commit: 2 fragment files, the record naming them (the commit point);
    # then build_section's compaction: record (pending), sections, manifest, record
    ("histmol.shards.corpus:move_to_trash:1", "the commit: staging not yet in place"),
    ("histmol.shards.corpus:commit_fragment:1", "the commit: parts in place, no fragment"),
    ("histmol.shards.fragments:atomic_write_bytes:3", "the commit: fragment files, no record"),
    ("histmol.shards.fragments:atomic_write_bytes:6", "compaction: sections renamed, manifest not"),
]
READER = """
import json, sys, time, warnings
from pathlib import Path
from histmol.data import PairDataset
root, stop, log, cache = sys.argv[1:5]
seen = []
while not Path(stop).exists():
    try:
        dataset = PairDataset(root, cache_dir=cache)
        pairs = {}
        for part in dataset.parts:
            pairs[part.section_id] = pairs.get(part.section_id, 0) + part.n_pairs
        seen.append(["ok", sorted(pairs.items())])
    except Exception as error:  # noqa: BLE001 - every error is the finding
        seen.append(["error", f"{type(error).__name__}: {error}"])
    Path(log + ".ready").touch()  # one open done: the test starts the rebuild now
Path(log).write_text(json.dumps(seen))
"""


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def make_inputs(root: Path) -> tuple[Path, Path]:
    """A Visium (10x MTX) and a legacy ST section plus a broken one; manifests A and B.

    B is A with other tissue options, so a ``--force`` ingest of B changes every section.
    """
    slide = make_slide(root / "slide.tif", width_um=900.0, height_um=800.0, mpp=0.5, seed=3)
    visium = write_visium_bundle(root / "visium", slide, matrix="mtx", seed=3, n_genes=40)
    write_st_bundle(root / "st", slide, image_mpp=0.5, seed=4, n_genes=30, sample="s1")
    broken = root / "broken" / "outs"
    shutil.copytree(visium.bundle, broken)
    (broken / "filtered_feature_bc_matrix" / "matrix.mtx.gz").write_bytes(b"not gzip")
    assert (visium.bundle / "filtered_feature_bc_matrix" / "matrix.mtx.gz").is_file()
    sections = [
        {"section_id": "syn-a", "platform": "visium", "bundle": "visium/outs",
         "wsi": "slide.tif", "transform": "visium/native_to_wsi.csv", "species": "human"},
        {"section_id": "syn-broken", "platform": "visium", "bundle": "broken/outs",
         "wsi": "slide.tif", "transform": "visium/native_to_wsi.csv"},
        {"section_id": "syn-st", "platform": "st", "bundle": "st", "wsi": "st/s1.jpg",
         "species": "human"},
    ]
    corpus = {"patch_px": 64, "target_mpp": 1.0}
    manifests = []
    for name, defaults in (("a", {}), ("b", {"min_tissue_fraction": 0.6})):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "corpus": corpus, "defaults": defaults,
                                        "sections": sections}, sort_keys=False))
        manifests.append(path)
    return manifests[0], manifests[1]


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
            "PREFECT_HOME": str(tmp / "prefect")}


def run(manifest: Path, out: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(DRIVER), str(manifest), str(out), *args],
                          env=env(tmp), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done


def kill_after(manifest: Path, out: Path, tmp: Path, delay: float, *args: str) -> str:
    """Start an ingest, SIGKILL it after `delay` s; return how it ended."""
    process = subprocess.Popen([sys.executable, str(DRIVER), str(manifest), str(out), *args],
                               env=env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        process.wait(timeout=delay)
        return f"finished before the kill (rc {process.returncode})"
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return "killed"
    finally:
        if process.stderr is not None:
            process.stderr.close()


def check_healed(out: Path, expected: dict[str, bytes], label: str) -> None:
    assert validate_corpus(out) == [], label
    got = tree(out)
    assert sorted(got) == sorted(expected), f"{label}: files differ"
    assert [k for k in got if got[k] != expected[k]] == [], f"{label}: bytes differ"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Inputs, and the uninterrupted corpora: A, then A rebuilt from B with --force."""
    tmp = tmp_path_factory.mktemp("faults")
    manifest_a, manifest_b = make_inputs(tmp / "inputs")
    started = time.perf_counter()
    assert run(manifest_a, tmp / "ref-a", tmp).returncode == 1  # syn-broken fails
    duration = time.perf_counter() - started
    shutil.copytree(tmp / "ref-a", tmp / "ref-b")
    assert run(manifest_b, tmp / "ref-b", tmp, "--force").returncode == 1
    ref_a, ref_b = tree(tmp / "ref-a"), tree(tmp / "ref-b")
    assert ref_a["sections.parquet"] != ref_b["sections.parquet"]
    assert validate_corpus(tmp / "ref-a") == [] and validate_corpus(tmp / "ref-b") == []
    return {"tmp": tmp, "a": manifest_a, "b": manifest_b, "ref_a": ref_a, "ref_b": ref_b,
            "duration": duration}


def test_kill_at_exact_points_then_rerun(world: dict[str, object]) -> None:
    tmp, manifest, expected = world["tmp"], world["a"], world["ref_a"]
    assert isinstance(tmp, Path) and isinstance(manifest, Path) and isinstance(expected, dict)
    outcomes = []
    for i, (where, what) in enumerate(EXACT):
        out = tmp / f"exact-{i}"
        done = subprocess.run([sys.executable, str(DRIVER), str(manifest), str(out),
                               "--die-at", where], env=env(tmp), capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == -signal.SIGKILL, f"{what}: never reached ({done.stderr})"
        run(manifest, out, tmp)
        check_healed(out, expected, f"killed at {where} ({what})")
        outcomes.append(what)
        shutil.rmtree(out)
    print(f"exact-point trials: {len(outcomes)} killed and healed: {outcomes}")


def test_kill_at_random_moments_then_rerun(world: dict[str, object]) -> None:
    tmp, manifest, expected = world["tmp"], world["a"], world["ref_a"]
    assert isinstance(tmp, Path) and isinstance(manifest, Path) and isinstance(expected, dict)
    duration = float(world["duration"])  # type: ignore[arg-type]
    rng = random.Random(14)
    for i in range(N_RANDOM):
        out = tmp / f"random-{i}"
        delay = rng.uniform(0.2, duration)
        how = kill_after(manifest, out, tmp, delay)
        run(manifest, out, tmp)
        check_healed(out, expected, f"trial {i}: {how} after {delay:.1f} s")
        print(f"random trial {i}: {how} after {delay:.1f} s of {duration:.1f} s: healed")
        shutil.rmtree(out)


def test_killed_force_rebuild_keeps_old_data_readable(world: dict[str, object]) -> None:
    tmp, manifest = world["tmp"], world["b"]
    assert isinstance(tmp, Path) and isinstance(manifest, Path)
    ref_a, ref_b = world["ref_a"], world["ref_b"]
    assert isinstance(ref_a, dict) and isinstance(ref_b, dict)
    duration = float(world["duration"])  # type: ignore[arg-type]
    rng = random.Random(19)
    for i in range(1):
        out = tmp / f"force-{i}"
        shutil.copytree(tmp / "ref-a", out)
        stop, log = tmp / f"stop-{i}", tmp / f"seen-{i}.json"
        reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop), str(log),
                                   str(tmp / f"cache-{i}")], env=env(tmp))
        ready = Path(f"{log}.ready")
        deadline = time.monotonic() + 300  # imports take long on a busy machine
        while not ready.exists() and time.monotonic() < deadline and reader.poll() is None:
            time.sleep(0.1)
        assert ready.exists(), "the reader never opened the corpus"
        delay = rng.uniform(0.5 * duration, duration)
        how = kill_after(manifest, out, tmp, delay, "--force")
        stop.touch()
        assert reader.wait(timeout=120) == 0
        seen = json.loads(log.read_text())
        errors = [s[1] for s in seen if s[0] == "error"]
        assert errors == [], errors[:3]
        old = _pairs(tmp / "ref-a")
        states = {json.dumps(s[1]) for s in seen}
        assert json.dumps(old) in states  # the old data was served during the rebuild
        for state in states:  # each section old or new, or absent in its commit's window
            for section_id, n_pairs in json.loads(state):
                assert n_pairs in (dict(old)[section_id], dict(_pairs(tmp / "ref-b"))[section_id])
        run(manifest, out, tmp, "--force")
        check_healed(out, ref_b, f"force trial {i}: {how} after {delay:.1f} s")
        print(f"force trial {i}: {how} after {delay:.1f} s; reader opened the corpus "
              f"{len(seen)} times, states seen {len(states)}, errors 0")
        shutil.rmtree(out)


def _pairs(root: Path) -> list[list[object]]:
    import pandas as pd

    manifest = pd.read_parquet(root / "manifest.parquet")
    return [[k, int(v)] for k, v in sorted(manifest.groupby("section_id")["n_pairs"].sum().items())]


def test_two_ingests_into_one_corpus_at_once(world: dict[str, object]) -> None:
    tmp, manifest, expected = world["tmp"], world["a"], world["ref_a"]
    assert isinstance(tmp, Path) and isinstance(manifest, Path) and isinstance(expected, dict)
    out = tmp / "twice"
    both = [subprocess.Popen([sys.executable, str(DRIVER), str(manifest), str(out)],
                             env=env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in both]
    for rc, stderr in results:
        assert rc == 1, stderr  # syn-broken fails in both
        lines = [ln for ln in stderr.splitlines()
                 if ln.startswith("syn-") and not ln.startswith("syn-broken")]
        for line in lines:  # a section the other committed first: a clear refusal
            assert "already committed" in line, line
    print(f"two ingests at once: {[r[1].count('already committed') for r in results]} clear "
          "refusals")
    run(manifest, out, tmp)  # and a re-run settles whatever the race left
    check_healed(out, expected, "two ingests at once")
