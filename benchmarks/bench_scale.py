"""Scale rehearsal: costs that grow with the corpus, measured on fabricated histMol-shaped corpora.

Usage (run by hand, one at a time, e.g. under ``nice -n 10``):

    .venv/bin/python benchmarks/bench_scale.py [--sizes 100,1000,3446] [--pairs 10e6,50e6]
        [--validate-sections 20] [--workers 2] [--out FILE]

Corpora come from `histmol.synth.scale.fabricate` (the real table builders). Measured, per size
N of the section curve (tables-only corpora: these costs read only tables):

- ``commit``: `Corpus.commit_section` of one more (small, real) section into a corpus of N
  sections, median of 3 (wall and CPU seconds: on a shared machine the CPU time is the steadier
  number): it writes the section's table fragment (`histmol.shards.fragments`); then
  ``compact``: `Corpus.compact` merging those fragments into the N-section tables, which a build
  pays once every ``COMPACT_AFTER`` commits and at its end. Linear fits ``a + b*N`` of both
  project the whole build's serial commit time;
- ``inspect``: `histmol.summary.summarise` (what ``histmol inspect`` prints);
- ``report``: `histmol.qc.report.write_report` (the HTML ``histmol report`` writes);
- ``loader``: `PairDataset` open, epoch-0 planning (order + one worker's positions of 8 ranks x
  8 workers) and the resume state's JSON size, at each ``--pairs`` target (3,446 sections with
  pairs scaled), each in a fresh process for its peak RSS;
- ``validate``: ``validate_corpus`` over a corpus WITH its (hard-linked, real) part files of
  ``--validate-sections`` sections, 1 and ``--workers`` processes: MB/s and units/s.

Writes JSON under benchmarks/results/ (default ``scale_<time>.json``); docs/scale.md is generated
from it by benchmarks/scale_doc.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
HISTMOL_SECTIONS = 3446


def _peak_mb() -> float:
    """This process' peak RSS in MB (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _extra_section(corpus: Any, index: int, templates: Path) -> tuple[float, float]:
    """Stage one small real visium section through the templates, commit it: (wall, CPU) s."""
    from histmol.synth.scale import SectionPlan, _Templates, profile, section_extras

    plan = SectionPlan(f"zz-extra-{index:03d}", "visium", "human", "colon", 1024)
    panels = {("visium", "human"): corpus.genes().query("species == 'human'")["index"]
              .to_numpy()[: profile("visium").panel]}
    staging = corpus.staging_dir(plan.section_id)
    staging.rmdir()  # the templates link into it: it is recreated by the first link
    record = _Templates(templates, 224, panels).link_part(plan, 0, 1024, staging)
    row = {**section_extras(plan, record.n_units), "panel": panels[("visium", "human")]}
    started, cpu = time.perf_counter(), time.process_time()
    corpus.commit_section(plan.section_id, staging, records=[record], row=row)
    return time.perf_counter() - started, time.process_time() - cpu


def bench_size(n: int, work: Path, templates: Path) -> dict[str, Any]:
    """Fabricate a tables-only corpus of `n` sections; time commit, inspect and report on it."""
    from histmol.qc.report import write_report
    from histmol.shards.corpus import Corpus
    from histmol.shards.fragments import COMPACT_AFTER
    from histmol.summary import summarise
    from histmol.synth.scale import fabricate

    root = work / f"corpus-{n}"
    started = time.perf_counter()
    made = fabricate(root, n, shards="none")
    fabricate_s = time.perf_counter() - started
    sizes = {name: (root / f"{name}.parquet").stat().st_size
             for name in ("genes", "sections", "manifest")}
    corpus = Corpus.open(root)
    commits, commit_cpu = zip(*(_extra_section(corpus, i, templates) for i in range(3)),
                              strict=True)
    started, cpu = time.perf_counter(), time.process_time()
    corpus.compact()  # the 3 fragments join the tables: what a build pays every COMPACT_AFTER
    compact_s, compact_cpu = time.perf_counter() - started, time.process_time() - cpu
    started = time.perf_counter()
    summary = summarise(root)
    inspect_s = time.perf_counter() - started
    started = time.perf_counter()
    write_report(root, work / f"report-{n}.html")
    report_s = time.perf_counter() - started
    row = {"sections": n, "parts": made.parts, "pairs": made.pairs, "units": made.units,
           "fabricate_s": round(fabricate_s, 2), "table_bytes": sizes,
           "report_bytes": (work / f"report-{n}.html").stat().st_size,
           "commit_s": [round(c, 4) for c in commits],
           "commit_median_s": round(statistics.median(commits), 4),
           "commit_cpu_median_s": round(statistics.median(commit_cpu), 4),
           "compact_s": round(compact_s, 4), "compact_cpu_s": round(compact_cpu, 4),
           "compact_after": COMPACT_AFTER,
           "inspect_s": round(inspect_s, 3), "report_s": round(report_s, 3),
           "inspect_sections": int(summary.totals["sections"])}
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def loader_child(root: str) -> dict[str, Any]:
    """Open a PairDataset, plan epoch 0 for one worker of 8 ranks x 8 workers; time, RSS, state."""
    import numpy as np

    from histmol.data import PairDataset
    from histmol.data.partition import assigned

    base = _peak_mb()
    started, cpu = time.perf_counter(), time.process_time()
    dataset = PairDataset(root, batch_size=256, world_size=8, rank=3, verify="size")
    open_s, open_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    order = dataset._order(0)
    positions = assigned(len(order), batch_size=256, world_size=8, rank=3, num_workers=8,
                         worker=5)
    ids = order[positions]
    plan_s, plan_cpu = time.perf_counter() - started, time.process_time() - cpu
    state = json.dumps(dataset.state_dict())
    return {"pairs": int(dataset.epoch_length), "parts": len(dataset.parts),
            "open_s": round(open_s, 3), "plan_s": round(plan_s, 3),
            "open_plan_s": round(open_s + plan_s, 3), "open_cpu_s": round(open_cpu, 3),
            "plan_cpu_s": round(plan_cpu, 3), "open_plan_cpu_s": round(open_cpu + plan_cpu, 3),
            "peak_rss_mb": round(_peak_mb(), 1), "rss_before_mb": round(base, 1),
            "state_bytes": len(state.encode()), "worker_samples": int(len(ids)),
            "checksum": int(np.sum(ids[:1000]))}


def bench_loader(target_pairs: float, work: Path) -> dict[str, Any]:
    """3,446 sections scaled to about `target_pairs` pairs; the loader measured in a child."""
    from histmol.synth.scale import fabricate, plan_cohort

    base = sum(p.n_pairs for p in plan_cohort(HISTMOL_SECTIONS))
    root = work / f"loader-{int(target_pairs)}"
    made = fabricate(root, HISTMOL_SECTIONS, shards="none", pair_scale=target_pairs / base)
    done = subprocess.run([sys.executable, __file__, "--loader-child", str(root)], check=True,
                          capture_output=True, text=True, env={**os.environ})
    row = {"target_pairs": target_pairs, "sections": made.sections,
           **json.loads(done.stdout.strip().splitlines()[-1])}
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def bench_validate(n: int, workers: int, work: Path, templates: Path) -> list[dict[str, Any]]:
    """Validate a fabricated corpus with its part files, 1 and `workers` processes."""
    import pandas as pd

    from histmol.synth.scale import fabricate
    from histmol.validate import validate_corpus

    made = fabricate(work / f"validate-{n}", n, template_dir=templates)
    manifest = pd.read_parquet(made.root / "manifest.parquet")
    megabytes = float(manifest["images_bytes"].sum() + manifest["units_bytes"].sum()) / 1e6
    rows = []
    for count in sorted({1, workers}):
        started = time.perf_counter()
        problems = validate_corpus(made.root, workers=count)
        wall = time.perf_counter() - started
        rows.append({"sections": n, "workers": count, "parts": made.parts, "units": made.units,
                     "megabytes": round(megabytes, 1), "wall_s": round(wall, 2),
                     "mb_per_s": round(megabytes / wall, 2),
                     "units_per_s": round(made.units / wall, 1), "problems": len(problems)})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(made.root, ignore_errors=True)
    return rows


def main() -> None:
    """Run the measurements named by the options and write one JSON file."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,3446")
    parser.add_argument("--pairs", default="10e6,50e6")
    parser.add_argument("--validate-sections", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--loader-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loader_child:
        print(json.dumps(loader_child(args.loader_child)))
        return
    work = Path(tempfile.mkdtemp(prefix="histmol-bench-scale-"))
    templates = work / "templates"
    report: dict[str, Any] = {"benchmark": "scale", "cpus": os.cpu_count(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        report["sizes"] = [bench_size(n, work, templates) for n in sizes]
        report["loader"] = [bench_loader(float(p), work) for p in args.pairs.split(",") if p]
        if args.validate_sections:
            report["validate"] = bench_validate(args.validate_sections, args.workers, work,
                                                templates)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or RESULTS / f"scale_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
