"""Per-pair embeddings of a trained run, to Parquet or to AnnData (``.h5ad``, ready for scanpy).

Parquet: one row per pair with ``section_id``, ``part``, ``pair_index``, ``image_embedding`` and
``expression_embedding`` (list<float32>, L2-normalised, in the shared CLIP space) and
``image_features`` (the frozen encoder output used by `histmol.model.evaluate`).
AnnData (https://anndata.readthedocs.io/en/stable/): ``X`` log1p-CP10k expression over the run's
genes, ``obs`` the pair ids, ``var`` the genes, ``obsm['X_histmol_image']``,
``obsm['X_histmol_expression']`` and ``obsm['X_histmol_features']``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torchdata.stateful_dataloader import StatefulDataLoader

from histmol.data import PairDataset, pair_collate, to_float_chw
from histmol.model.clip import normalise_expression
from histmol.model.train import load_model
from histmol.progress import track
from histmol.shards.atomic import atomic_write_parquet


def embed_corpus(run: str | os.PathLike[str], corpus: str | os.PathLike[str] | Sequence[str],
                 out: str | os.PathLike[str], *, batch_size: int = 128,
                 device: str = "cpu") -> Path:
    """Embed every pair of `corpus` (stored order) with the run's model; write `out`.

    The format follows the suffix: ``.h5ad`` writes AnnData, anything else Parquet.
    """
    model, payload = load_model(run, device=device)
    dataset = PairDataset(corpus, genes=list(payload["genes"]), shuffle="none",
                          batch_size=batch_size, batched=True, aggregate_units=True)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "part", "pair_index", "image", "expression", "features", "x")}
    sections: list[str] = []
    with torch.inference_mode():
        batches = StatefulDataLoader(dataset, batch_size=None, collate_fn=pair_collate)
        for batch in track(batches, "embed", total=dataset.epoch_length, unit="pairs",
                           weight=lambda b: len(b["pair_index"])):
            features = model.image_features(to_float_chw(batch["patch"].to(device)))
            x = normalise_expression(batch["expression"], batch["panel_mask"]).to(device)
            mask = batch["panel_mask"].to(device)
            cols["features"].append(features.float().cpu().numpy())
            cols["image"].append(F.normalize(model.image_proj(features), dim=-1).cpu().numpy())
            cols["expression"].append(F.normalize(model.expression(x, mask), dim=-1).cpu().numpy())
            cols["x"].append(x.cpu().numpy())
            cols["part"].append(batch["part"].numpy())
            cols["pair_index"].append(batch["pair_index"].numpy())
            sections += batch["section_id"]
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".h5ad":
        obs = pd.DataFrame({"section_id": pd.Categorical(sections), "part": arrays["part"],
                            "pair_index": arrays["pair_index"]})
        obs.index = [f"{s}:{p}:{i}" for s, p, i in zip(sections, arrays["part"],
                                                       arrays["pair_index"], strict=True)]
        var = dataset.genes.set_index("gene_id")
        adata = ad.AnnData(X=arrays["x"].astype(np.float32), obs=obs, var=var, obsm={
            "X_histmol_image": arrays["image"], "X_histmol_expression": arrays["expression"],
            "X_histmol_features": arrays["features"]})
        tmp = out.with_name(out.name + ".tmp.h5ad")
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
        return out

    def lists(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.float32).ravel()),
                                                 a.shape[1])

    table = pa.table({"section_id": pa.array(sections, pa.string()),
                      "part": pa.array(arrays["part"]),
                      "pair_index": pa.array(arrays["pair_index"]),
                      "image_embedding": lists(arrays["image"]),
                      "expression_embedding": lists(arrays["expression"]),
                      "image_features": lists(arrays["features"])})
    atomic_write_parquet(out, table)
    return out
