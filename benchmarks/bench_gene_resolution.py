"""Time and memory of resolving a panel's features to the gene reference, and the reference's size.

Two panels, as the issue sizes them: a whole-transcriptome Visium feature table (36,601 human
features: versioned Ensembl ids with their symbols, as Space Ranger's features.tsv gives them)
and a Stereo-seq GEM panel (25,000 mouse symbols, names only; 5% of them made-up names that
stay unresolved, so the unresolved path is timed too). Each case runs in a fresh process: the
reference is loaded first (timed apart: once per process), then `resolve_features` runs
`--repeat` times; reported are the median and max wall time, the median CPU time (the machine
may be shared: the 1-minute load average is recorded), the tracemalloc peak of one resolution
(numpy and pandas allocations included) and the process' peak RSS growth over the resolution.
Limits from the issue: under 1 s and under 200 MB. Writes JSON to
benchmarks/results/gene_resolution_<time>.json (or `--out`)::

    .venv/bin/python benchmarks/bench_gene_resolution.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"visium_whole_transcriptome": 36601, "stereo_seq_gem_symbols": 25000}


def _panel(case: str, n: int) -> tuple[list[str], list[str]]:
    """A realistic panel of `n` features built from the shipped reference."""
    import numpy as np

    from histmol.gene_reference import reference

    genes = reference().genes
    rng = np.random.default_rng(0)
    if case == "visium_whole_transcriptome":
        human = genes[(genes["species"] == "human")]
        rows = human.iloc[np.sort(rng.choice(len(human), n, replace=False))]
        ids = [f"{e}.{v}" for e, v in zip(rows["ensembl_id"], rng.integers(1, 9, n), strict=True)]
        names = rows["symbol"].fillna(rows["ensembl_id"]).tolist()
        return ids, names
    mouse = genes[(genes["species"] == "mouse") & genes["symbol"].notna()]
    rows = mouse.iloc[np.sort(rng.choice(len(mouse), n, replace=False))]
    names = rows["symbol"].tolist()
    for i in rng.choice(n, n // 20, replace=False):
        names[i] = f"Zz{i}Made"
    return names, names


def measure(case: str, repeat: int) -> dict:
    """Run one case in this process (called in a fresh subprocess)."""
    import resource
    import tracemalloc

    from histmol.gene_reference import reference, resolve_features

    started = time.perf_counter()
    reference()
    load_s = time.perf_counter() - started
    ids, names = _panel(case, CASES[case])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        resolved = resolve_features(ids, names)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    tracemalloc.start()
    resolve_features(ids, names)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    times.sort()
    return {
        "case": case, "n_features": len(ids), "reference_load_s": round(load_s, 3),
        "resolve_median_s": round(times[len(times) // 2], 4), "resolve_max_s": round(times[-1], 4),
        "resolve_cpu_median_s": round(sorted(cpu)[len(cpu) // 2], 4),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "tracemalloc_peak_mb": round(peak_mb, 1), "rss_growth_mb": round(rss_growth_mb, 1),
        "resolved_fraction": round(float(resolved["resolved"].mean()), 4),
        "under_limits": times[len(times) // 2] < 1.0 and peak_mb < 200 and rss_growth_mb < 200,
    }


def main() -> None:
    """Run every case in its own process and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child process
        print(json.dumps(measure(args.case, args.repeat)))
        return
    from histmol.gene_reference import REFERENCE_DIR

    rows = []
    for case in CASES:
        done = subprocess.run([sys.executable, __file__, "--case", case, "--repeat",
                               str(args.repeat)], check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": platform.platform(), "python": platform.python_version(),
        "reference_bytes": {p.name: p.stat().st_size for p in sorted(REFERENCE_DIR.iterdir())},
        "cases": rows,
    }
    out = args.out or RESULTS / f"gene_resolution_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
