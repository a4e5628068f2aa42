"""The training loop: plain PyTorch, AMP on GPU, DDP under torchrun, exact resume.

A checkpoint (``<out>/checkpoint.pt``, written atomically) holds the model, optimizer, scheduler,
python/numpy/torch RNG states, the StatefulDataLoader state (torchdata,
https://pytorch.org/data/beta/torchdata.stateful_dataloader.html) and the step counter; resuming
loads the loader state into `PairDataset.load_state_dict` (elastic: any world size) and continues
the exact sequence of batches and updates. Metrics go to the console (rich) and to
``metrics.jsonl`` + ``metrics.csv``. DDP follows https://pytorch.org/docs/stable/elastic/run.html:
torchrun sets RANK/WORLD_SIZE/LOCAL_RANK and PairDataset partitions by torch.distributed's rank.
The contrastive loss uses each rank's own batch (no all-gather of negatives).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from histmol.data import PairDataset, pair_collate, to_float_chw
from histmol.errors import ConfigError
from histmol.model.clip import HistMolCLIP, ModelConfig
from histmol.model.config import TRAIN_OPTIONS, TrainConfig
from histmol.progress import report_task
from histmol.split import Split, read_split

CHECKPOINT = "checkpoint.pt"
METRIC_FIELDS = ("step", "epoch", "loss", "contrastive", "prediction", "lr", "pairs_per_s")


def _distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed under torchrun; return (rank, world size, device)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def cosine_lambda(total_steps: int, warmup_steps: int):  # noqa: ANN201 - a LambdaLR factor
    """Linear warm-up then cosine decay to 0 over `total_steps` optimizer steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def dihedral(patches: torch.Tensor) -> torch.Tensor:
    """Random flips and transpose per patch (H&E has no canonical orientation); torch RNG."""
    flips = torch.rand(3, len(patches)) < 0.5
    view = (-1, 1, 1, 1)
    patches = torch.where(flips[0].view(view).to(patches.device), patches.flip(-1), patches)
    patches = torch.where(flips[1].view(view).to(patches.device), patches.flip(-2), patches)
    if patches.shape[-1] == patches.shape[-2]:
        patches = torch.where(flips[2].view(view).to(patches.device),
                              patches.transpose(-1, -2), patches)
    return patches


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_model(run: str | os.PathLike[str], *, device: str | torch.device = "cpu",
               trained: bool = True) -> tuple[HistMolCLIP, dict[str, Any]]:
    """Load the run's model (``trained=False``: the same architecture at its seeded init)."""
    path = Path(run) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{path}: no checkpoint (train first)")
    payload = torch.load(path, map_location=device, weights_only=False)
    torch.manual_seed(int(payload["train_config"]["seed"]))
    model = HistMolCLIP(ModelConfig(**payload["model_config"])).to(device)
    if trained:
        model.load_state_dict(payload["model"])
    return model.eval(), payload


def make_dataset(corpus: str | os.PathLike[str] | Sequence[str], config: TrainConfig,
                 genes: str | Sequence[str] | None = None,
                 sections: Sequence[str] | None = None) -> PairDataset:
    """Open the training stream: whole batches of uint8 patches, per-pair summed expression.

    Batched uint8 is the loader's fast path (workers decode into shared buffers): a quarter of
    the bytes of float patches to move to the main process and to the GPU; `to_float_chw` makes
    the model's input on the device. `sections` (a fold's training part) is all it reads.
    """
    if genes is None:  # "all", "hvg:K" or a comma-separated list of gene ids / symbols
        genes = config.genes if config.genes == "all" or config.genes.startswith("hvg:") else [
            g.strip() for g in config.genes.split(",") if g.strip()]
    return PairDataset(corpus, genes=genes, seed=config.seed, batch_size=config.batch_size,
                       batched=True, aggregate_units=True, drop_last=True, sections=sections)


class _Metrics:
    """Console + metrics.jsonl + metrics.csv (appended on resume)."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out, self.enabled, self.console = out, enabled, Console(stderr=True)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not (self.out / "metrics.csv").exists()
        with open(self.out / "metrics.csv", "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.console.print(
            f"[bold]step {row['step']}[/] epoch {row['epoch']} loss {row['loss']:.4f} "
            f"(clip {row['contrastive']:.4f}, pred {row['prediction']:.4f}) "
            f"lr {row['lr']:.2e} {row['pairs_per_s']:.1f} pairs/s")


def train(corpus: str | os.PathLike[str] | Sequence[str], out: str | os.PathLike[str],
          config: TrainConfig, *, resume: bool = False, split: Split | None = None,
          fold: int | None = None) -> dict[str, Any]:
    """Train on `corpus` into `out`; with `resume`, continue exactly from its checkpoint.

    With a `split`, trains on fold `fold`'s training sections only (the held-out ones are never
    read, nor used to choose ``hvg:K`` genes) and records the split's checksum and both parts
    in the checkpoint, which `histmol.model.evaluate` checks. Returns a summary: steps done,
    last losses, pairs/s over this call, finished or paused.
    """
    out = Path(out)
    if (split is None) != (fold is None):
        raise ConfigError("give both a split and a fold, or neither")
    record = split.record(fold) if split is not None and fold is not None else None
    rank, world, device = _distributed()
    checkpoint = out / CHECKPOINT
    payload = None
    if resume:
        if not checkpoint.is_file():
            raise ConfigError(f"{checkpoint}: nothing to resume")
        payload = torch.load(checkpoint, map_location=device, weights_only=False)
        if payload.get("split") != record:
            raise ConfigError(f"{checkpoint} was trained on split {_describe(payload.get('split'))}"
                              f", not {_describe(record)}: resume it with the same split and fold")
        saved = {k: v for k, v in payload["train_config"].items() if k != "max_steps"}
        config = TrainConfig(**{**saved, "max_steps": config.max_steps})
    elif checkpoint.exists():
        raise ConfigError(f"{checkpoint} exists: pass --resume or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    genes = payload["genes"] if payload else None
    sections = record["train_sections"] if record is not None else None
    dataset = make_dataset(corpus, config, genes, sections)
    if split is not None:
        split.check_covers([sid for s in dataset.sources
                            for sid in s.manifest.column("section_id").to_pylist()],
                           ", ".join(s.url for s in dataset.sources))
    patch_px = int(dataset.sources[0].meta["build_config"]["patch_px"])
    torch.manual_seed(config.seed)
    model_config = ModelConfig(n_genes=len(dataset.gene_set), patch_px=patch_px,
                               image_encoder=config.image_encoder, width=config.width,
                               embed_dim=config.embed_dim)
    model: nn.Module = HistMolCLIP(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    batches = dataset.epoch_length // (config.batch_size * world)
    if batches < 1:
        raise ConfigError(f"{dataset.epoch_length} pairs give no full batch of "
                          f"{config.batch_size} x {world} ranks")
    steps_per_epoch = math.ceil(batches / config.grad_accum)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(total, min(config.warmup_steps, total)))
    step, micro = 0, 0  # micro: batches of the current epoch already consumed
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        dataset.load_state_dict(payload["loader"])
        _set_rng_state(payload["rng"])
        step, micro = int(payload["step"]), int(payload["micro"])
    else:
        (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
        if record is not None:
            (out / "split.json").write_text(json.dumps(record, indent=2))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loader = StatefulDataLoader(dataset, batch_size=None, collate_fn=pair_collate,
                                num_workers=config.num_workers, pin_memory=device.type == "cuda")
    amp = device.type == "cuda"
    metrics = _Metrics(out, rank == 0)

    def save() -> None:
        if rank == 0:
            _save(checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "loader": loader.state_dict(), "step": step, "micro": micro % batches,
                "model_config": model_config.to_dict(), "train_config": asdict(config),
                "genes": list(dataset.gene_set.gene_id), "split": record})

    started, seen, last = time.perf_counter(), 0, {}
    window_start, window_pairs = started, 0
    paused = False
    epoch = int(dataset.epoch)
    while epoch < config.epochs and not paused:
        dataset.set_epoch(epoch)
        for batch in loader:
            patches = to_float_chw(batch["patch"].to(device, non_blocking=True))
            if config.augment:
                patches = dihedral(patches)
            expression = batch["expression"].to(device, non_blocking=True)
            mask = batch["panel_mask"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                result = net(patches, expression, mask)
            loss = result["contrastive"] + config.prediction_weight * result["prediction"]
            (loss / config.grad_accum).backward()
            micro += 1
            seen += len(patches) * world
            window_pairs += len(patches) * world
            last = {"loss": loss.item(), "contrastive": result["contrastive"].item(),
                    "prediction": result["prediction"].item()}
            if micro % config.grad_accum and micro < batches:
                continue
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            report_task("train", step, total, "steps")
            if step % config.log_every == 0:
                now = time.perf_counter()
                metrics.log({"step": step, "epoch": epoch, **last, "lr": lr,
                             "pairs_per_s": window_pairs / max(now - window_start, 1e-9)})
                window_start, window_pairs = now, 0
            if step % config.checkpoint_every == 0:
                save()
            if config.max_steps is not None and step >= config.max_steps:
                paused = True
                break
        else:
            epoch, micro = epoch + 1, 0
    if not paused or step % config.checkpoint_every:
        save()
    if world > 1:
        torch.distributed.barrier()
    elapsed = time.perf_counter() - started
    return {"step": step, "epochs": config.epochs, "finished": not paused, **last,
            "pairs": seen, "seconds": elapsed, "pairs_per_s": seen / max(elapsed, 1e-9)}


def _describe(record: dict[str, Any] | None) -> str:
    return "none" if record is None else f"{record['sha256'][:12]} fold {record['fold']}"


def fold_dir(out: str | os.PathLike[str], fold: int) -> Path:
    """Where fold `fold` of a split run lives: ``<out>/fold-<fold>``."""
    return Path(out) / f"fold-{fold}"


def train_folds(corpus: str | os.PathLike[str] | Sequence[str], out: str | os.PathLike[str],
                config: TrainConfig, split: Split, folds: Sequence[int] | None = None, *,
                resume: bool = False) -> list[dict[str, Any]]:
    """Train each fold (default: all) of `split` into ``<out>/fold-<i>``; one summary a fold."""
    chosen = range(len(split.folds)) if folds is None else folds
    return [{"fold": int(i), **train(corpus, fold_dir(out, i), config, resume=resume,
                                     split=split, fold=int(i))} for i in chosen]


def config_from_args(values: dict[str, Any]) -> TrainConfig:
    """Make a TrainConfig from keyword options, ignoring unknown keys and None values."""
    names = {spec.name for spec in TRAIN_OPTIONS}
    return TrainConfig(**{k: v for k, v in values.items() if k in names and v is not None})


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m histmol.model.train", description=__doc__)
    parser.add_argument("corpus", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--split", default=None, help="split file (histmol split)")
    parser.add_argument("--fold", type=int, default=None, help="with --split: the fold (OUT)")
    for spec in TRAIN_OPTIONS:  # the options of `histmol train`, from the same declarations
        kind = _flag if spec.value_type is bool else spec.value_type
        parser.add_argument(spec.cli_flag, type=kind, default=None,
                            help=f"{spec.help} (default: {spec.default_label})")
    args = vars(parser.parse_args())
    split_file, fold = args.pop("split"), args.pop("fold")
    split = read_split(split_file) if split_file is not None else None
    summary = train(args.pop("corpus"), args.pop("out"), config_from_args(args),
                    resume=args.pop("resume"), split=split, fold=fold)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    print(json.dumps(summary))


if __name__ == "__main__":
    _main()
