"""HEST-Benchmark protocol over a split: each fold scored with the encoder trained without it.

Follows HEST-Benchmark (Jaume et al. 2024, https://github.com/mahmoodlab/HEST, ``hest/bench``):
frozen image features, standardised (StandardScaler fitted on the fold's training part), PCA to
256 components, ``Ridge(solver='lsqr', alpha=100 / (n_features * n_genes), fit_intercept=False)``,
Pearson per gene on the fold's held-out sections. Folds come from a split file
(`histmol.split`), the same one `histmol train --split` trained each fold's encoder on; a fold
whose run recorded another split or fold is refused (its encoder would have seen the test
pairs). Targets: ``hvg:K`` ranks genes on each fold's TRAINING sections only (log1p-CP10k,
`histmol.data.genes`), or a fixed list / ``all``; each fold normalises over its own genes, as
training does. Uses scikit-learn
(https://scikit-learn.org/stable/modules/generated/sklearn.linear_model.Ridge.html).

Models: ``trained`` (the fold's encoder), ``random-init`` (the same architecture at its seeded
initialisation) and ``mean-expression`` (predicts the training part's mean per gene; a constant
prediction has no Pearson, so it scores 0, and its MSE is the reference), all on exactly the same
folds, pairs and genes. Every pair is decoded once (batched loader) and passed through every
encoder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from torchdata.stateful_dataloader import StatefulDataLoader

from histmol.data import PairDataset, pair_collate, resolve_genes, to_float_chw
from histmol.data.source import open_sources
from histmol.errors import ConfigError
from histmol.model.clip import HistMolCLIP, normalise_expression
from histmol.model.train import CHECKPOINT, fold_dir, load_model
from histmol.shards.atomic import atomic_write_parquet
from histmol.split import Split

MODELS = ("trained", "random-init", "mean-expression")
Progress = Callable[[int, int], None]  # (pairs done, pairs in all)


def embed_pairs(models: dict[str, HistMolCLIP], corpus: str | os.PathLike[str] | Sequence[str],
                *, genes: str | Sequence[str], sections: Sequence[str] | None = None,
                batch_size: int = 256, num_workers: int = 0, device: str | torch.device = "cpu",
                progress: Progress | None = None) -> dict[str, Any]:
    """Frozen image features of every pair under each named model, raw counts and ids.

    One pass of the batched loader (stored order): each batch is decoded once and fed to every
    model. Returns ``features`` (name -> (N, D)), ``counts`` and ``mask`` ((N, G) over the
    loader's genes), ``section_id``, ``part``, ``pair_index`` and ``genes`` (a DataFrame).
    """
    dataset = PairDataset(corpus, genes=genes, shuffle="none", batch_size=batch_size,
                          batched=True, aggregate_units=True, sections=sections)
    loader = StatefulDataLoader(dataset, batch_size=None, collate_fn=pair_collate,
                                num_workers=num_workers,
                                pin_memory=torch.device(device).type == "cuda")
    feats: dict[str, list[np.ndarray]] = {name: [] for name in models}
    counts, masks, sections_out, parts, pairs = [], [], [], [], []
    total, done = dataset.epoch_length, 0
    for model in models.values():
        model.eval()
    cuda = torch.device(device).type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for batch in loader:  # bf16 on a GPU, as training runs there; fp32 on the CPU
            patches = to_float_chw(batch["patch"].to(device, non_blocking=True))
            for name, model in models.items():
                feats[name].append(model.image_features(patches).float().cpu().numpy())
            counts.append(batch["expression"].numpy().astype(np.float32))
            masks.append(batch["panel_mask"].numpy())
            sections_out += list(batch["section_id"])
            parts.append(batch["part"].numpy())
            pairs.append(batch["pair_index"].numpy())
            done += len(patches)
            if progress is not None:
                progress(done, total)
    return {"features": {k: np.concatenate(v) for k, v in feats.items()},
            "counts": np.concatenate(counts), "mask": np.concatenate(masks),
            "section_id": np.array(sections_out), "part": np.concatenate(parts),
            "pair_index": np.concatenate(pairs), "genes": dataset.genes,
            "sources": dataset.sources}


def _pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-column Pearson r; NaN where either side is constant."""
    p, t = pred - pred.mean(0), true - true.mean(0)
    denom = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * t).sum(0) / denom, np.nan)


def ridge_fold(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               n_components: int = 256, seed: int = 0) -> np.ndarray:
    """HEST's probe: standardise, PCA (at most 256), lsqr ridge without intercept; predictions."""
    scaler = StandardScaler().fit(x_train)
    k = min(n_components, x_train.shape[0], x_train.shape[1])
    pca = PCA(n_components=k, random_state=seed).fit(scaler.transform(x_train))
    a, b = pca.transform(scaler.transform(x_train)), pca.transform(scaler.transform(x_test))
    ridge = Ridge(solver="lsqr", alpha=100 / (a.shape[1] * y_train.shape[1]),
                  fit_intercept=False, max_iter=1000, random_state=seed)
    # PCA scores are centred on the training fold, so centring y changes no coefficient (X'1 = 0):
    # HEST's Pearson is unchanged and adding the mean back makes the MSE meaningful.
    mean = y_train.mean(0)
    return ridge.fit(a, y_train - mean).predict(b) + mean


def score_fold(features: np.ndarray | None, expression: np.ndarray, mask: np.ndarray,
               train: np.ndarray, test: np.ndarray, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-gene Pearson and MSE on `test` of a probe fitted on `train` (boolean row masks).

    ``features=None`` is the mean-expression baseline (Pearson 0). Genes the test part never
    measured get NaN; MSE counts measured (pair, gene) entries only.
    """
    if not train.any() or not test.any():
        raise ConfigError("a fold needs pairs on both sides (train and test)")
    y_train, y_test, m = expression[train], expression[test], mask[test]
    if features is None:
        pred = np.broadcast_to(y_train.mean(0), y_test.shape)
        r = np.zeros(expression.shape[1])
    else:
        pred = ridge_fold(features[train], y_train, features[test], seed=seed)
        r = _pearson(pred, y_test)
    measured = m.any(0)
    err = (pred - y_test) ** 2 * m
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = np.where(measured, err.sum(0) / np.maximum(m.sum(0), 1), np.nan)
    return {"pearson": np.where(measured, r, np.nan), "mse": mse,
            "mse_all": np.array(float(err.sum() / max(m.sum(), 1)))}


def _fold_genes(spec: str | Sequence[str], sources: list[Any], split: Split) -> list[list[str]]:
    """Each fold's target gene ids: ``hvg:K`` ranked on that fold's training sections."""
    return [list(resolve_genes(spec, sources, sections=split.train_sections(i)).gene_id)
            for i in range(len(split.folds))]


def _load_folds(run: Path, split: Split, device: str | torch.device
                ) -> tuple[dict[str, HistMolCLIP], dict[int, str], dict[int, int]]:
    """The trained encoder of every fold (checked against the split) and the random inits.

    Random inits with the same architecture and seed are the same weights: embedded once.
    """
    models: dict[str, HistMolCLIP] = {}
    random_of: dict[int, str] = {}
    seeds: dict[int, int] = {}
    for i in range(len(split.folds)):
        folder = fold_dir(run, i)
        if not (folder / CHECKPOINT).is_file():
            raise ConfigError(f"{folder / CHECKPOINT}: no checkpoint for fold {i}; train it "
                              f"with `histmol train --split ... --fold {i} --out {run}`")
        model, payload = load_model(folder, device=device)
        if payload.get("split") != split.record(i):
            raise ConfigError(
                f"{folder}: trained on another split or fold than fold {i} of this split (its "
                "encoder may have seen the held-out pairs); train it again with this split")
        models[f"trained/{i}"] = model
        seeds[i] = int(payload["train_config"]["seed"])
        config = payload["model_config"]
        key = (f"random-init/{config['image_encoder']}-{config['width']}-{config['patch_px']}-"
               f"{seeds[i]}")
        if key not in models:
            models[key] = load_model(folder, device=device, trained=False)[0]
        random_of[i] = key
    return models, random_of, seeds


def evaluate_split(run: str | os.PathLike[str], corpus: str | os.PathLike[str] | Sequence[str],
                   split: Split, *, genes: str | Sequence[str] = "hvg:50",
                   batch_size: int = 256, num_workers: int = 0, device: str | None = None,
                   out: str | os.PathLike[str] | None = None,
                   progress: Progress | None = None) -> dict[str, pd.DataFrame]:
    """Score every fold of `split` (runs in ``<run>/fold-<i>``) and both baselines.

    Returns and writes (Parquet and CSV, into `out`, default ``<run>/eval``): ``per_gene`` (fold,
    model, gene, Pearson, MSE), ``per_fold`` (fold, model, mean/median Pearson, MSE, pairs) and
    ``summary`` (per model: mean and sd over folds).
    """
    run = Path(run)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models, random_of, seeds = _load_folds(run, split, device)
    sources = open_sources(corpus if isinstance(corpus, str | os.PathLike) else list(corpus))
    held = [sid for s in sources for sid in s.manifest.column("section_id").to_pylist()]
    split.check_covers(held, ", ".join(s.url for s in sources))
    fold_genes = _fold_genes(genes, sources, split)
    union = list(dict.fromkeys(g for fold in fold_genes for g in fold))
    data = embed_pairs(models, corpus, genes=union,
                       sections=[s for s in split.sections if s in set(held)],
                       batch_size=batch_size, num_workers=num_workers, device=device,
                       progress=progress)
    column = {g: j for j, g in enumerate(data["genes"]["gene_id"])}
    symbols = dict(zip(data["genes"]["gene_id"], data["genes"]["symbol"], strict=True))
    gene_rows, fold_rows = [], []
    for i, fold in enumerate(fold_genes):
        test = np.isin(data["section_id"], split.test_sections(i))
        train = np.isin(data["section_id"], split.train_sections(i))
        cols = [column[g] for g in fold]
        mask = data["mask"][:, cols]
        expression = normalise_expression(torch.from_numpy(data["counts"][:, cols]),
                                          torch.from_numpy(mask)).numpy()
        candidates = {"trained": data["features"][f"trained/{i}"],
                      "random-init": data["features"][random_of[i]], "mean-expression": None}
        for name, features in candidates.items():
            r = score_fold(features, expression, mask, train, test, seed=seeds[i])
            gene_rows.append(pd.DataFrame({
                "fold": i, "model": name, "gene_id": fold,
                "symbol": [symbols.get(g) for g in fold], "pearson": r["pearson"],
                "mse": r["mse"], "n_test_pairs": int(test.sum())}))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fold_rows.append({
                    "fold": i, "model": name, "pearson_mean": float(np.nanmean(r["pearson"])),
                    "pearson_median": float(np.nanmedian(r["pearson"])),
                    "mse": float(r["mse_all"]), "n_genes": len(fold),
                    "n_train_pairs": int(train.sum()), "n_test_pairs": int(test.sum()),
                    "test_groups": ",".join(split.folds[i])})
    per_gene = pd.concat(gene_rows, ignore_index=True)
    per_fold = pd.DataFrame(fold_rows)
    summary = summarise(per_fold)
    folder = Path(out) if out is not None else run / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in (("per_gene", per_gene), ("per_fold", per_fold), ("summary", summary)):
        atomic_write_parquet(folder / f"{name}.parquet", pa.Table.from_pandas(
            table, preserve_index=False))
        tmp = folder / f"{name}.csv.tmp"
        table.to_csv(tmp, index=False)
        os.replace(tmp, folder / f"{name}.csv")
    return {"per_gene": per_gene, "per_fold": per_fold, "summary": summary}


def summarise(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean and sample sd over folds of the fold's mean Pearson and MSE."""
    rows = []
    for name in MODELS:
        part = per_fold[per_fold["model"] == name]
        if part.empty:
            continue
        rows.append({"model": name, "pearson_mean": part["pearson_mean"].mean(),
                     "pearson_sd": part["pearson_mean"].std(ddof=1) if len(part) > 1 else 0.0,
                     "mse_mean": part["mse"].mean(),
                     "mse_sd": part["mse"].std(ddof=1) if len(part) > 1 else 0.0,
                     "n_folds": len(part), "n_genes": int(part["n_genes"].max()),
                     "n_pairs": int((part["n_train_pairs"] + part["n_test_pairs"]).max())})
    return pd.DataFrame(rows)
