"""Does the loader keep a GPU training step busy? PairDataset + StatefulDataLoader -> train step.

Builds (once, cached in --workdir) a synthetic spot-like corpus (benchmarks/bench_loader.py's
`build_corpus`: H&E-like JPEG patches, one unit of ~500 genes each) or reads --corpus, then for
each loader mode (``batched``: ``PairDataset(batched=True)``, workers decode into reused shared
buffers; ``per_sample``: ``collate_fn=pair_collate``) and worker count runs real training steps of
histmol.model's CLIP model (image encoder ``vit-tiny`` or ``resnet18``, InfoNCE + masked MSE,
AdamW; on CUDA AMP bf16, pinned host memory, non-blocking copies) and reports:

- ``steps_per_s`` and ``pairs_per_s`` over the timed steps;
- ``gpu_busy_fraction``: time inside the step (copy to device, forward, backward, optimizer,
  ``torch.cuda.synchronize``) over total time; the rest is waiting on the loader;
- ``compute_only_steps_per_s``: the same step on one resident batch (the ceiling);
- the single-thread JPEG decode limit on this machine (per worker, the loader's ceiling).

Runs on CPU with tiny sizes (the tests do). Writes JSON to --out. Example on a GPU machine:

    python benchmarks/bench_gpu_feed.py --out gpu_feed.json --pairs 16384 --workers 0,2,4,8

Imports: torch, numpy, pandas, pyarrow, fsspec, scipy, imagecodecs, google-crc32c, torchdata
(and to build the corpus h5py, tifffile, as histmol.synth.morphology imports them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import build_corpus, decode_limit  # noqa: E402


def device_of(name: str) -> torch.device:
    """`name`, or cuda when available for "auto"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One training step of HistMolCLIP on a host batch (uint8 (B, H, W, 3) patches)."""

    def __init__(self, n_genes: int, patch_px: int, encoder: str, width: int,
                 device: torch.device) -> None:
        from histmol.model.clip import HistMolCLIP, ModelConfig

        self.device = device
        self.model = HistMolCLIP(ModelConfig(n_genes=n_genes, patch_px=patch_px,
                                             image_encoder=encoder, width=width)).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def __call__(self, batch: dict) -> float:
        """Run the step; returns the loss (synchronising, so timings are honest)."""
        from histmol.data import to_float_chw

        device = self.device
        patches = batch["patch"].to(device, non_blocking=True)
        expression = batch["expression"].to(device, non_blocking=True)
        mask = batch["panel_mask"].to(device, non_blocking=True)
        patches = to_float_chw(patches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = self.model(patches, expression, mask)
            loss = out["contrastive"] + out["prediction"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        value = float(loss.detach())  # synchronises
        sync(device)
        return value


def feed(root: Path, step: Step, *, batched: bool, workers: int, batch_size: int, steps: int,
         warmup: int) -> dict:
    """Train `steps` steps fed by the loader; time spent waiting vs stepping."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from histmol.data import PairDataset, pair_collate

    ds = PairDataset(root, genes="hvg:2000", seed=0, batch_size=batch_size, batched=batched,
                     aggregate_units=True)
    loader = StatefulDataLoader(
        ds, batch_size=None if batched else batch_size, num_workers=workers,
        collate_fn=pair_collate, pin_memory=step.device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=workers > 0)

    def batches():  # endless: epochs follow each other
        while True:
            yield from loader

    it = batches()
    for _ in range(warmup):
        step(next(it))
    waited = stepped = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        waited, stepped = waited + t1 - t0, stepped + t2 - t1
    elapsed = time.perf_counter() - started
    it.close()
    return {"mode": "batched" if batched else "per_sample", "workers": workers,
            "steps_per_s": steps / elapsed, "pairs_per_s": steps * batch_size / elapsed,
            "gpu_busy_fraction": stepped / elapsed, "loader_wait_s_per_step": waited / steps,
            "step_s": stepped / steps}


def compute_only(root: Path, step: Step, batch_size: int, steps: int) -> float:
    """Steps/s on one resident host batch: what the step costs without any loading."""
    from histmol.data import PairDataset

    ds = PairDataset(root, genes="hvg:2000", batch_size=batch_size, batched=True,
                     aggregate_units=True)
    batch = next(iter(ds))
    if step.device.type == "cuda":
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    step(batch)
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, build or reuse the corpus, run every mode x worker count, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON result path")
    parser.add_argument("--corpus", type=Path, help="an existing corpus (else one is built)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "histmol-bench-gpu-feed")
    parser.add_argument("--pairs", type=int, default=16384)
    parser.add_argument("--sections", type=int, default=4)
    parser.add_argument("--patch-px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2,4", help="comma-separated worker counts")
    parser.add_argument("--modes", default="batched,per_sample")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--encoder", default="vit-tiny", choices=("vit-tiny", "resnet18"))
    parser.add_argument("--width", type=int, default=64, help="encoder width (vit dim = 2x)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = device_of(args.device)
    if args.corpus is not None:
        root = args.corpus
    else:
        root = args.workdir / f"corpus-{args.pairs}-{args.patch_px}px"
        build_corpus(root, args.pairs, args.sections, patch_px=args.patch_px,
                     pairs_per_shard=min(2048, max(1, args.pairs // args.sections)))
    from histmol.data import PairDataset

    n_genes = len(PairDataset(root, genes="hvg:2000").genes)
    torch.manual_seed(0)
    step = Step(n_genes, args.patch_px, args.encoder, args.width, device)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "corpus": str(root), "patch_px": args.patch_px, "batch_size": args.batch_size,
        "encoder": args.encoder, "width": args.width, "genes": n_genes,
        "amp": "bf16" if device.type == "cuda" else "off",
        "decode_limit_per_s": decode_limit(root, 500)["decode_per_s"],
        "compute_only_steps_per_s": compute_only(root, step, args.batch_size, args.steps),
        "runs": [],
    }
    for workers in (int(w) for w in args.workers.split(",")):
        for mode in args.modes.split(","):
            if mode not in ("batched", "per_sample"):
                raise SystemExit(f"unknown mode {mode!r}: batched or per_sample")
            run = feed(root, step, batched=mode == "batched", workers=workers,
                       batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
            run["keeps_up"] = run["steps_per_s"] >= 0.9 * result["compute_only_steps_per_s"]
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
