"""HEST-Benchmark protocol on a corpus: frozen image embeddings -> ridge -> per-gene Pearson.

Follows HEST-Benchmark (Jaume et al. 2024, https://github.com/mahmoodlab/HEST, ``hest/bench``):
embeddings standardised (StandardScaler fitted on the training fold), PCA to 256 components,
``Ridge(solver='lsqr', alpha=100 / (n_features * n_genes), fit_intercept=False)``, Pearson per
gene on held-out sections; folds leave one patient (or section) out; targets are the top-K
variable genes in log1p-CP10k (``hvg:K``, `histmol.data.genes`). Uses scikit-learn
(https://scikit-learn.org/stable/modules/generated/sklearn.linear_model.Ridge.html).

Rows of the table: ``trained`` (the run's encoder), ``random-init`` (the same architecture at its
seeded initialisation) and ``mean-expression`` (predicts the training fold's mean per gene; a
constant prediction has no Pearson, so it scores 0 there, and its MSE is the reference).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from histmol.data import PairDataset, pair_collate
from histmol.errors import ConfigError
from histmol.model.clip import HistMolCLIP, normalise_expression
from histmol.model.train import load_model
from histmol.progress import track

SPLITS = ("patient", "section")


def frozen_features(model: HistMolCLIP, corpus: str | os.PathLike[str] | Sequence[str], *,
                    genes: str | Sequence[str], batch_size: int = 128,
                    device: str | torch.device = "cpu",
                    description: str = "model") -> dict[str, Any]:
    """Image features, log1p-CP10k expression and ids of every pair, in stored order."""
    dataset = PairDataset(corpus, genes=genes, shuffle="none", batch_size=batch_size,
                          patch_format="float_chw", aggregate_units=True)
    feats, expr, masks, sections, parts, pairs = [], [], [], [], [], []
    model.eval()
    with torch.no_grad():
        batches = DataLoader(dataset, batch_size=batch_size, collate_fn=pair_collate)
        for batch in track(batches, f"features ({description})", total=dataset.epoch_length,
                           unit="pairs", weight=lambda b: len(b["pair_index"])):
            feats.append(model.image_features(batch["patch"].to(device)).float().cpu().numpy())
            expr.append(normalise_expression(batch["expression"], batch["panel_mask"]).numpy())
            masks.append(batch["panel_mask"].numpy())
            sections += batch["section_id"]
            parts.append(batch["part"].numpy())
            pairs.append(batch["pair_index"].numpy())
    return {"features": np.concatenate(feats), "expression": np.concatenate(expr),
            "mask": np.concatenate(masks), "section_id": np.array(sections),
            "part": np.concatenate(parts), "pair_index": np.concatenate(pairs),
            "genes": dataset.genes, "sources": dataset.sources}


def split_groups(data: dict[str, Any], split_by: str) -> np.ndarray:
    """Each pair's held-out group: its section, or its patient (sections.parquet patient_id)."""
    if split_by not in SPLITS:
        raise ConfigError(f"split_by must be one of {SPLITS}, got {split_by!r}")
    if split_by == "section":
        return data["section_id"]
    patient: dict[str, str] = {}
    for source in data["sources"]:
        for sid, row in source.section_rows().items():
            patient[sid] = str(row.get("patient_id") or "")
    missing = sorted({s for s in data["section_id"] if not patient.get(s)})
    if missing:
        raise ConfigError(f"split by patient: sections {missing[:5]} have no patient_id in "
                          "sections.parquet (build with metadata patient_id, or split by section)")
    return np.array([patient[s] for s in data["section_id"]])


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


def score(features: np.ndarray, expression: np.ndarray, mask: np.ndarray,
          groups: np.ndarray, *, method: Literal["ridge", "mean"] = "ridge",
          seed: int = 0) -> dict[str, Any]:
    """Leave-one-group-out: per-gene Pearson (mean over folds) and MSE over measured entries."""
    folds = np.unique(groups)
    if len(folds) < 2:
        raise ConfigError(f"the held-out protocol needs >= 2 groups, got {list(folds)}")
    per_fold, mses = [], []
    for group in folds:
        test = groups == group
        train = ~test
        if method == "mean":
            pred = np.broadcast_to(expression[train].mean(0), expression[test].shape)
            r = np.zeros(expression.shape[1])
        else:
            pred = ridge_fold(features[train], expression[train], features[test], seed=seed)
            r = _pearson(pred, expression[test])
        r = np.where(mask[test].any(0), r, np.nan)  # genes never measured in the fold: no score
        per_fold.append(r)
        m = mask[test]
        mses.append(float(((pred - expression[test]) ** 2 * m).sum() / max(m.sum(), 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_gene = np.nanmean(np.array(per_fold), axis=0)
    return {"per_gene": per_gene, "pearson_mean": float(np.nanmean(per_gene)),
            "pearson_median": float(np.nanmedian(per_gene)), "mse": float(np.mean(mses)),
            "n_folds": len(folds)}


def evaluate_run(run: str | os.PathLike[str], corpus: str | os.PathLike[str] | Sequence[str], *,
                 split_by: str = "patient", genes: str | Sequence[str] = "hvg:50",
                 batch_size: int = 128, out: str | os.PathLike[str] | None = None,
                 device: str = "cpu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score the run, a random-init twin and the mean baseline; (summary table, per-gene table).

    Writes ``eval.csv`` and ``eval_genes.csv`` into `out` (default: ``<run>/eval``).
    """
    trained, payload = load_model(run, device=device, trained=True)
    random_init, _ = load_model(run, device=device, trained=False)
    seed = int(payload["train_config"]["seed"])
    data = frozen_features(trained, corpus, genes=genes, batch_size=batch_size, device=device,
                           description="trained")
    groups = split_groups(data, split_by)
    base = frozen_features(random_init, corpus, genes=genes, batch_size=batch_size,
                           device=device, description="random init")["features"]
    results = {
        "trained": score(data["features"], data["expression"], data["mask"], groups, seed=seed),
        "random-init": score(base, data["expression"], data["mask"], groups, seed=seed),
        "mean-expression": score(data["features"], data["expression"], data["mask"], groups,
                                 method="mean"),
    }
    table = pd.DataFrame([{"model": name, "pearson_mean": r["pearson_mean"],
                           "pearson_median": r["pearson_median"], "mse": r["mse"],
                           "n_folds": r["n_folds"], "n_genes": len(r["per_gene"]),
                           "n_pairs": len(groups), "split_by": split_by}
                          for name, r in results.items()])
    per_gene = data["genes"].assign(**{name: r["per_gene"] for name, r in results.items()})
    folder = Path(out) if out is not None else Path(run) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "eval.csv", index=False)
    per_gene.to_csv(folder / "eval_genes.csv", index=False)
    return table, per_gene
