"""Training throughput on CPU, and the acceptance run on a synthetic corpus with a known answer.

Builds (cached in --workdir) a synthetic Visium corpus from `histmol.synth`: one slide per
section whose tissue regions drive marker genes (the generator knows the truth), 64 px patches
at 0.5 um/px, two sections per patient. Trains the compact model on it, then runs the
HEST-Benchmark protocol (`histmol.model.evaluate`: leave-one-patient-out, one encoder trained per
fold without its held-out patient, hvg:50 on each training part) and reports the trained encoders
against the random-init and mean-expression baselines, plus training pairs/s, and an oracle: the
same probe fed each pair's true tissue region (the ceiling morphology allows).

Writes JSON to benchmarks/results/train_<time>.json. Run by hand:

    .venv/bin/python benchmarks/bench_train.py [--sections 8] [--epochs 20] [--encoder vit-tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.model.clip import normalise_expression
from histmol.model.evaluate import embed_pairs, evaluate_split, score_fold
from histmol.model.train import TrainConfig, load_model, train_folds
from histmol.split import Split, make_split
from histmol.synth import make_slide, write_visium_bundle


def synthetic_corpus(root: Path, sections: int) -> Path:
    """Build `sections` synthetic Visium sections, two per patient, into root/corpus.

    Also writes root/truth.parquet: each unit's true tissue region (section_id, unit_id, region).
    """
    corpus = root / "corpus"
    truths = []
    for i in range(sections):
        slide = make_slide(root / f"slide{i}.tif", width_um=1400.0, height_um=1200.0, mpp=0.5,
                           seed=10 + i)
        truth = write_visium_bundle(root / f"visium{i}", slide, seed=10 + i, n_genes=60)
        request = SectionRequest("visium", truth.bundle, slide.path, f"syn-{i}",
                                 truth.transform_path, metadata={"patient_id": f"p{i // 2}"})
        build_section(request, corpus, BuildConfig(patch_px=64))
        truths.append(pd.DataFrame({"section_id": f"syn-{i}", "unit_id": truth.unit_ids.astype(str),
                                    "region": truth.region.astype(np.int64)}))
    pd.concat(truths).to_parquet(root / "truth.parquet")
    return corpus


def oracle(corpus: Path, run: Path, split: Split, truth: pd.DataFrame) -> dict[str, Any]:
    """Score the same probe fed each pair's true region (one-hot): what morphology can explain."""
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    units = pd.concat(pd.read_parquet(corpus / row.units_path, columns=["pair_index", "unit_id"])
                      .assign(section_id=row.section_id, part=row.part)
                      for row in manifest.itertuples())
    units = units.merge(truth, on=["section_id", "unit_id"], validate="one_to_one")
    region = units.set_index(["section_id", "part", "pair_index"])["region"]
    per_fold = []
    for i in range(len(split.folds)):
        model, payload = load_model(run / f"fold-{i}")
        data = embed_pairs({"m": model}, corpus, genes=list(payload["genes"]))
        keys = list(zip(data["section_id"], data["part"], data["pair_index"], strict=True))
        labels = region.loc[keys].to_numpy()
        onehot = np.eye(labels.max() + 1)[labels]
        expression = normalise_expression(torch.from_numpy(data["counts"]),
                                          torch.from_numpy(data["mask"])).numpy()
        test = np.isin(data["section_id"], split.test_sections(i))
        r = score_fold(onehot, expression, data["mask"], ~test, test)
        per_fold.append({"fold": i, "pearson_mean": float(np.nanmean(r["pearson"])),
                         "mse": float(r["mse_all"])})
    return {"pearson_mean": float(np.mean([f["pearson_mean"] for f in per_fold])),
            "mse": float(np.mean([f["mse"] for f in per_fold])), "per_fold": per_fold}


def acceptance(corpus: Path, run: Path, split: Split, config: TrainConfig) -> dict[str, Any]:
    """Train every fold then evaluate; per-fold and summary records plus the training summaries."""
    shutil.rmtree(run, ignore_errors=True)
    summaries = train_folds(corpus, run, config, split)
    tables = evaluate_split(run, corpus, split, genes="hvg:50")
    return {"train": summaries, "eval": tables["summary"].to_dict(orient="records"),
            "eval_per_fold": tables["per_fold"].to_dict(orient="records")}


def main() -> None:
    """Build the corpus once, train, evaluate, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/histmol-bench-train"))
    parser.add_argument("--sections", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encoder", default="vit-tiny")
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.workdir / "corpus"
    if not (args.workdir / "truth.parquet").is_file():
        shutil.rmtree(corpus, ignore_errors=True)
        synthetic_corpus(args.workdir, args.sections)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=2e-3,
                         image_encoder=args.encoder, width=args.width, genes="hvg:50",
                         log_every=1000, checkpoint_every=10**9)
    started = time.perf_counter()
    split = make_split([{"section_id": f"syn-{i}", "patient_id": f"p{i // 2}", "n_pairs": 1}
                        for i in range(args.sections)], "patient")
    result = acceptance(corpus, args.workdir / "run", split, config)
    result["oracle_true_regions"] = oracle(corpus, args.workdir / "run", split,
                                           pd.read_parquet(args.workdir / "truth.parquet"))
    result.update(config=vars(args) | {"workdir": str(args.workdir)},
                  torch_threads=torch.get_num_threads(), machine=platform.platform(),
                  seconds=time.perf_counter() - started)
    out = Path(__file__).parent / "results" / f"train_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    print(out)


if __name__ == "__main__":
    main()
