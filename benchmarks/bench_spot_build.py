"""End-to-end spot-mode build of a synthetic Visium section from a 0.25 um/px pyramidal WSI.

Reports patches/s per core and the split into read, resample and encode+write time, plus image
bytes per pair, as JSON under benchmarks/results/. Run by hand:

    .venv/bin/python benchmarks/bench_spot_build.py [--size-mm 10.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.synth import make_slide, write_visium_bundle

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    """Generate the slide and bundle, build once, and write the timings as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mm", type=float, default=10.0,
                        help="slide side; 10 mm puts tissue under ~all 4,992 Visium spots")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="histmol-bench-"))
    started = time.perf_counter()
    side_um = args.size_mm * 1000
    slide = make_slide(work / "slide.tif", width_um=side_um, height_um=side_um, mpp=0.25, seed=0,
                       n_regions=4)
    truth = write_visium_bundle(work / "visium", slide, seed=0, n_genes=500)
    generate_s = time.perf_counter() - started

    out = work / "corpus"
    shutil.rmtree(out, ignore_errors=True)
    request = SectionRequest("visium", truth.bundle, slide.path, "bench", truth.transform_path)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = build_section(request, out, BuildConfig(), threads=args.threads)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    manifest = pd.read_parquet(out / "manifest.parquet")
    cores = min(args.threads, os.cpu_count() or 1)
    report = {
        "benchmark": "spot_build",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "slide": {"width_px": slide.width, "height_px": slide.height, "mpp": slide.mpp,
                  "generate_s": round(generate_s, 2)},
        "threads": args.threads,
        "spots_in_bundle": int(truth.counts.shape[0]),
        "pairs": result.n_pairs,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "patches_per_s": round(result.n_pairs / wall, 1),
        "patches_per_s_per_core": round(result.n_pairs / wall / cores, 1),
        "stage_s": {key: round(value, 3) for key, value in result.timings.items()},
        "image_bytes_per_pair": round(float(manifest["images_bytes"].sum()) / result.n_pairs, 1),
        "units_bytes_per_pair": round(float(manifest["units_bytes"].sum()) / result.n_pairs, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"spot_build_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written to {path}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
