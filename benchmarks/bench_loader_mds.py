"""MDS baseline for bench_loader.py; runs in the separate benchmark venv (mosaicml-streaming).

Not part of histmol: it imports only numpy, Pillow, torch and mosaicml-streaming, and reads the
export written by bench_loader.export_for_mds (per part: shard path, JPEG index, units CSR). It
writes the same pairs (the same JPEG bytes, the same sparse counts) with ``MDSWriter``, then reads
them with ``StreamingDataset`` (py1e shuffle, batch 256) through a torch DataLoader with 0, 1
and 2 workers, decoding each JPEG with Pillow and densifying the counts over the same 2,000 genes
(https://docs.mosaicml.com/projects/streaming/en/stable/). ``--write`` writes the MDS dataset,
``--workers W`` reads it once; each prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming import MDSWriter, StreamingDataset
from streaming.base.util import clean_stale_shared_memory

COLUMNS = {"jpeg": "bytes", "gene_idx": "ndarray:int32", "counts": "ndarray:int32"}


def pairs(export: Path):
    """(jpeg bytes, gene_idx, counts) of every exported pair, in corpus order."""
    for k, shard in enumerate(json.loads((export / "parts.json").read_text())):
        index = np.load(export / f"index-{k}.npy")
        offsets = np.load(export / f"offsets-{k}.npy")
        genes, counts = np.load(export / f"genes-{k}.npy"), np.load(export / f"counts-{k}.npy")
        with open(shard, "rb") as handle:
            for i, (offset, nbytes) in enumerate(index):
                handle.seek(int(offset))
                lo, hi = offsets[i], offsets[i + 1]
                yield handle.read(int(nbytes)), genes[lo:hi], counts[lo:hi]


class PairMDS(StreamingDataset):
    """StreamingDataset decoding the JPEG and densifying the counts, like PairDataset."""

    def __init__(self, lookup: np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lookup = lookup
        self.n_genes = int(lookup.max()) + 1

    def __getitem__(self, idx):  # noqa: ANN001, ANN204 - StreamingDataset's signature
        sample = super().__getitem__(idx)
        patch = np.asarray(Image.open(io.BytesIO(sample["jpeg"])).convert("RGB"))
        cols = self.lookup[sample["gene_idx"]]
        keep = cols >= 0
        expression = np.zeros((1, self.n_genes), dtype=np.float32)
        expression[0, cols[keep]] = sample["counts"][keep]
        return {"patch": patch, "expression": expression}


def collate(samples):  # noqa: ANN001, ANN201
    """Stack patches and expression rows, like pair_collate."""
    return {"patch": torch.from_numpy(np.stack([s["patch"] for s in samples])),
            "expression": torch.from_numpy(np.concatenate([s["expression"] for s in samples]))}


def pil_decode_limit(export: Path, n: int = 1000) -> float:
    """Single-thread Pillow decodes/s of the first `n` JPEGs."""
    jpegs = [pair[0] for _, pair in zip(range(n), pairs(export), strict=False)]
    started = time.perf_counter()
    for data in jpegs:
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return len(jpegs) / (time.perf_counter() - started)


def write(export: Path, out: Path) -> dict:
    """Write every exported pair to an MDS dataset at `out`."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    n = 0
    with MDSWriter(out=str(out), columns=COLUMNS, size_limit=1 << 26) as writer:
        for jpeg, genes, counts in pairs(export):
            writer.write({"jpeg": jpeg, "gene_idx": genes, "counts": counts})
            n += 1
    return {"write_s": time.perf_counter() - started, "pairs": n}


def read(export: Path, out: Path, workers: int, batches: int, warmup: int) -> dict:
    """pairs/s of StreamingDataset through a DataLoader with `workers` workers."""
    clean_stale_shared_memory()
    limit = pil_decode_limit(export)
    ds = PairMDS(np.load(export / "lookup.npy"), local=str(out), shuffle=True, shuffle_seed=0,
                 batch_size=256)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers,
                                         collate_fn=collate,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    rate = batches * 256 / (time.perf_counter() - started)
    assert batch["patch"].shape[0] == 256
    limit = (limit + pil_decode_limit(export)) / 2
    return {"workers": workers, "pairs_per_s": rate, "pil_decode_per_s": limit,
            "per_worker_vs_pil_decode": rate / (max(workers, 1) * limit)}


def main() -> None:
    """Write (--write) or read (--workers W) the MDS baseline; print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    if args.write:
        result = write(args.export, args.out)
    else:
        result = read(args.export, args.out, args.workers, args.batches, args.warmup)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
