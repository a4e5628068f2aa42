"""Grid-mode build of a synthetic Visium HD section: speed and peak memory, at any section size.

Generates a slide and a Space Ranger HD bundle holding only 2 um bins (plus 16 um ones for the
ground truth), so the build must sum 2 um bins into `--bin-um` squares while streaming: the
memory-critical path. The adapter alone, then the whole build, each run in a fresh child process
so that neither generation nor the other run is counted in its peak RSS (ru_maxrss). Reports
units/s per core (units read / (wall x cores used)) and units per CPU second (which a shared,
busy machine distorts less), pairs, stage times and peak RSS as JSON
under benchmarks/results/. Run by hand, e.g. for two section sizes:

    .venv/bin/python benchmarks/bench_visium_hd.py --size-mm 3.25 --bin-um 8
    .venv/bin/python benchmarks/bench_visium_hd.py --size-mm 6.5 --bin-um 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MARGIN_UM = 60.0  # histmol.synth.visium_hd.MARGIN_UM: the slide is the grid plus this border


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """User + system CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> None:
    """Run one measured step in this fresh process and print its numbers as one JSON line."""
    if args.child == "read":
        from platform_adapters import visium_hd

        started = time.perf_counter()
        section = visium_hd.read(args.bundle, wsi=args.wsi, bin_um=args.bin_um)
        report = {"wall_s": time.perf_counter() - started, "units": section.n_units,
                  "nnz": int(section.counts.nnz), "genes": section.n_genes}
    else:
        from histmol.build import SectionRequest, build_section
        from histmol.config import BuildConfig

        request = SectionRequest("visium-hd", args.bundle, args.wsi, "bench", args.transform,
                                 options={"bin_um": args.bin_um})
        started = time.perf_counter()
        result = build_section(request, args.out, BuildConfig(), threads=args.threads)
        report = {"wall_s": time.perf_counter() - started, "units": int(result.qc["n_units_read"]),
                  "units_in_pairs": result.n_units, "pairs": result.n_pairs,
                  "bytes": result.bytes, "stage_s": result.timings}
    report.update(peak_rss_mb=peak_rss_mb(), cpu_s=cpu_s())
    print(json.dumps(report))


def run_child(kind: str, args: argparse.Namespace, bundle: Path, wsi: Path, transform: Path,
              out: Path) -> dict[str, object]:
    """Run `child(kind)` in a fresh interpreter and return its JSON report."""
    command = [sys.executable, __file__, "--child", kind, "--bundle", str(bundle), "--wsi",
               str(wsi), "--transform", str(transform), "--out", str(out), "--bin-um",
               str(args.bin_um), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Generate the section, measure the adapter and the build in children, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mm", type=float, default=6.5, help="side of the 2 um bin grid")
    parser.add_argument("--bin-um", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=("read", "build"), default=None, help=argparse.SUPPRESS)
    for name in ("--bundle", "--wsi", "--transform", "--out"):
        parser.add_argument(name, type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from histmol.synth import make_slide, write_visium_hd_bundle

    work = args.workdir or Path(tempfile.mkdtemp(prefix="histmol-bench-hd-"))
    side_um = args.size_mm * 1000 + 2 * MARGIN_UM + 30  # + rotation slack: ~size/2 um bins a side
    started = time.perf_counter()
    slide = make_slide(work / "slide.tif", width_um=side_um, height_um=side_um, mpp=0.5, seed=0)
    slide_s = time.perf_counter() - started
    truth = write_visium_hd_bundle(work / "hd", slide, bin_sizes=(2, 16), seed=0,
                                   n_genes=args.n_genes, truth_bin_um=16, images=False)
    bundle_s = time.perf_counter() - started - slide_s
    generate_rss = peak_rss_mb()
    read = run_child("read", args, truth.bundle, slide.path, truth.transform_path, work / "c0")
    shutil.rmtree(work / "corpus", ignore_errors=True)
    corpus = work / "corpus"
    build = run_child("build", args, truth.bundle, slide.path, truth.transform_path, corpus)
    cores = min(args.threads, os.cpu_count() or 1)
    n_rows, n_cols = truth.extra["grid_shape"]
    report = {
        "benchmark": "visium_hd_grid_build",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "section": {"size_mm": args.size_mm, "bins_2um": n_rows * n_cols,
                    "bins_2um_in_tissue": truth.extra["n_filtered_bins"][2],
                    "grid_2um": [n_rows, n_cols], "n_genes": args.n_genes,
                    "slide_px": [slide.width, slide.height], "mpp": slide.mpp},
        "generate_s": {"slide": round(slide_s, 1), "bundle": round(bundle_s, 1),
                       "peak_rss_mb": round(generate_rss, 1)},
        "bin_um": args.bin_um,
        "threads": args.threads,
        "adapter": {k: round(v, 3) if isinstance(v, float) else v for k, v in read.items()},
        "build": build,
        "units": build["units"],
        "pairs": build["pairs"],
        "units_per_s_per_core": round(build["units"] / (build["wall_s"] * cores), 1),
        "adapter_units_per_s_per_core": round(read["units"] / (read["wall_s"] * cores), 1),
        "units_per_cpu_s": round(build["units"] / build["cpu_s"], 1),  # robust on a busy machine
        "build_peak_rss_mb": round(build["peak_rss_mb"], 1),
        "adapter_peak_rss_mb": round(read["peak_rss_mb"], 1),
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"visium_hd_{args.size_mm:g}mm_{args.bin_um}um_{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"{args.size_mm:g} mm, {n_rows * n_cols:,} 2 um bins -> {build['units']:,} "
          f"{args.bin_um} um units in {build['pairs']:,} pairs: build {build['wall_s']:.1f} s, "
          f"{report['units_per_s_per_core']:,} units/s/core, peak RSS "
          f"{build['peak_rss_mb']:.0f} MB (adapter alone {read['peak_rss_mb']:.0f} MB); "
          f"written to {path}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
