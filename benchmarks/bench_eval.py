"""Wall time of `histmol eval` (per-fold HEST protocol) on about 1,000 pairs at the default model.

Builds (cached in --workdir) synthetic Visium sections (`histmol.synth`) at the default build
settings (224 px patches at 0.5 um/px), two patients, splits them by patient (2 folds), trains
each fold for a few steps at the default model size (vit-tiny, width 64; the weights do not
change the cost of evaluating), then times `evaluate_split`: loading the folds' encoders, HVGs
on each training part, one batched pass embedding every pair through every encoder (2 trained
plus the shared random init), and the ridge probes and tables. The embedding pass is timed
separately through the progress callback, and the CPU seconds used (the wall time on a shared,
loaded machine overstates the cost). Writes JSON to benchmarks/results/eval_<time>.json.

    .venv/bin/python benchmarks/bench_eval.py [--sections 4] [--width-um 2600] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import torch

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.data.source import open_sources
from histmol.model.evaluate import evaluate_split
from histmol.model.train import TrainConfig, train_folds
from histmol.split import make_split
from histmol.synth import make_slide, write_visium_bundle


def build_corpus(root: Path, sections: int, width_um: float) -> Path:
    """`sections` synthetic Visium sections (default build settings), two patients."""
    corpus = root / "corpus"
    if (root / "built").is_file():
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    for i in range(sections):
        slide = make_slide(root / f"slide{i}.tif", width_um=width_um, height_um=width_um,
                           mpp=0.5, seed=20 + i)
        truth = write_visium_bundle(root / f"visium{i}", slide, seed=20 + i, n_genes=120)
        build_section(SectionRequest("visium", truth.bundle, slide.path, f"syn-{i}",
                                     truth.transform_path, metadata={"patient_id": f"p{i % 2}"}),
                      corpus, BuildConfig())
    (root / "built").write_text("")
    return corpus


def main() -> None:
    """Build once, train both folds briefly, time the evaluation, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/histmol-bench-eval"))
    parser.add_argument("--sections", type=int, default=4)
    parser.add_argument("--width-um", type=float, default=1700.0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.workdir, args.sections, args.width_um)
    [source] = open_sources(str(corpus))
    rows = [{**row, "n_pairs": 0} for row in source.section_rows().values()]
    split = make_split(rows, "patient")
    run = args.workdir / "run"
    shutil.rmtree(run, ignore_errors=True)
    train_folds(corpus, run, TrainConfig(epochs=1, batch_size=32, max_steps=2,
                                         log_every=1000), split)
    marks: list[float] = []
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    tables = evaluate_split(run, corpus, split, genes="hvg:50", batch_size=args.batch_size,
                            num_workers=args.workers,
                            progress=lambda done, total: marks.append(time.perf_counter()))
    total = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    pairs = int(source.manifest.column("n_pairs").to_numpy().sum())
    result = {
        "pairs": pairs, "folds": len(split.folds), "encoders_per_batch": len(split.folds) + 1,
        "seconds_total": total, "seconds_to_first_batch": marks[0] - started,
        "seconds_embedding": marks[-1] - started, "pairs_per_s_embedding":
            pairs / max(marks[-1] - started, 1e-9),
        "seconds_per_1000_pairs": total / pairs * 1000,
        # CPU seconds the evaluation used (all threads): on a shared, loaded machine the wall
        # time above overstates the cost; this over the core count estimates an idle machine's
        "cpu_seconds": cpu, "cpu_seconds_per_1000_pairs": cpu / pairs * 1000,
        "cores": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "summary": tables["summary"].to_dict(orient="records"),
        "config": {k: str(v) for k, v in vars(args).items()},
        "model": "vit-tiny width 64 (default), 224 px patches (default build)",
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "machine": platform.platform(),
    }
    out = Path(__file__).parent / "results" / f"eval_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    print(out)


if __name__ == "__main__":
    main()
