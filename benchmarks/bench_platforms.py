"""One table over all 12 platforms: build time, units/s per core, pairs and bytes per pair.

Every platform's synthetic bundle is written over the same synthetic slide area (so sections
are of comparable size), then built with the default config (224 px at 0.5 um/px) in the
platform's default tiling mode. Writes JSON under benchmarks/results/. Run by hand:

    .venv/bin/python benchmarks/bench_platforms.py [--size-mm 2.5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from histmol import synth
from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from platform_adapters import PLATFORMS

RESULTS = Path(__file__).resolve().parent / "results"
# Platforms whose bundles carry no placement of their own: the generator's true transform is
# passed as --transform would be. The others place themselves (alignment files, spot-detector
# pixels, corner spots, an aligned image).
NEEDS_TRANSFORM = {"visium", "visium-hd", "slide-seq", "cosmx", "merscope", "seq-scope"}
SLIDE_MPP = {"stereo-seq": 0.5}  # its H&E is registered at the DNB pitch
WRITER_OPTIONS: dict[str, dict[str, Any]] = {"st": {"image_mpp": 0.5}}  # a JPEG fine enough
WRITERS: dict[str, Callable[..., Any]] = {
    "visium": synth.write_visium_bundle,
    "visium-hd": synth.write_visium_hd_bundle,
    "xenium": synth.write_xenium_bundle,
    "st": synth.write_st_bundle,
    "stereo-seq": synth.write_stereo_seq_bundle,
    "slide-seq": synth.write_slide_seq_bundle,
    "cosmx": synth.write_cosmx_bundle,
    "merscope": synth.write_merscope_bundle,
    "dbit-seq": synth.write_dbit_seq_bundle,
    "seq-scope": synth.write_seq_scope_bundle,
    "hdst": synth.write_hdst_bundle,
    "open-st": synth.write_open_st_bundle,
}


def measure(work: Path, side_um: float, threads: int) -> list[dict]:
    """Generate and build one section per platform in `work`; one row per platform."""
    slides: dict[float, synth.SyntheticSlide] = {}
    cores = min(threads, os.cpu_count() or 1)
    rows = []
    for platform, writer in WRITERS.items():
        mpp = SLIDE_MPP.get(platform, 0.25)
        if mpp not in slides:
            slides[mpp] = synth.make_slide(
                work / f"slide-{mpp}.tif", width_um=side_um, height_um=side_um, mpp=mpp, seed=7
            )
        started = time.perf_counter()
        try:
            truth = writer(work / platform, slides[mpp], seed=7,
                           **WRITER_OPTIONS.get(platform, {}))
        except ValueError as error:  # e.g. a fixed-size chip that does not fit a small slide
            rows.append({"platform": platform, "error": f"synthetic bundle: {error}"})
            print(f"{platform}: NOT GENERATED {error}")
            continue
        generate_s = time.perf_counter() - started
        out = work / f"corpus-{platform}"
        transform = truth.transform_path if platform in NEEDS_TRANSFORM else None
        request = SectionRequest(
            platform, truth.bundle, truth.wsi_path, platform.replace("-", ""), transform
        )
        t0 = time.perf_counter()
        try:
            result = build_section(request, out, BuildConfig(), threads=threads)
        except Exception as error:  # noqa: BLE001 - report the platform, keep measuring the rest
            rows.append({"platform": platform, "error": f"{type(error).__name__}: {error}"})
            print(f"{platform}: FAILED {error}")
            continue
        wall = time.perf_counter() - t0
        manifest = pd.read_parquet(out / "manifest.parquet")
        image_bytes = float(manifest["images_bytes"].sum())
        unit_bytes = float(manifest["units_bytes"].sum())
        row = {
            "platform": platform,
            "mode": result.qc.get("qc_mode"),
            "units": result.n_units,
            "pairs": result.n_pairs,
            "genes": result.n_genes,
            "generate_s": round(generate_s, 2),
            "build_s": round(wall, 2),
            "units_per_s_per_core": round(result.n_units / wall / cores, 1),
            "bytes_per_pair": round((image_bytes + unit_bytes) / max(result.n_pairs, 1), 1),
            "unit_bytes_per_pair": round(unit_bytes / max(result.n_pairs, 1), 1),
        }
        rows.append(row)
        print(json.dumps(row))
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    """Build every platform's synthetic section, then print and write the JSON table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mm", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    assert set(WRITERS) == set(PLATFORMS), "every platform needs a synthetic writer here"
    work = Path(tempfile.mkdtemp(prefix="histmol-bench-platforms-"))
    try:
        rows = measure(work, args.size_mm * 1000, args.threads)
    finally:  # generated slides and bundles are large: never leave them behind
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "platforms",
        "slide_mm": args.size_mm,
        "slide_mpp": 0.25,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"platforms_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
