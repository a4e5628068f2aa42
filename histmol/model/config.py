"""The trainer's options, each declared once (histmol.options): no torch, so the CLI's help is fast.

`histmol train`, `python -m histmol.model.train` and the options `histmol eval` and
`histmol embed` share with training are derived from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from histmol.options import TRAIN, check_fields, option, specs_of


@dataclass(frozen=True)
class TrainConfig:
    """Training options; saved in the run folder (``train_config.json``)."""

    epochs: int = option(10, TRAIN, "Passes over the training pairs.", ge=1)
    batch_size: int = option(256, TRAIN, "Pairs per batch (per rank under torchrun).", ge=1)
    lr: float = option(1e-3, TRAIN, "Peak learning rate (cosine schedule).", gt=0)
    weight_decay: float = option(0.05, TRAIN, "AdamW weight decay.", ge=0)
    warmup_steps: int = option(10, TRAIN, "Optimizer steps of linear learning-rate warm-up.",
                               ge=0)
    grad_accum: int = option(1, TRAIN, "Micro-batches per optimizer step.", ge=1)
    genes: str = option("hvg:50", TRAIN, "all, hvg:K or a comma-separated gene list.")
    image_encoder: str = option(
        "vit-tiny", TRAIN, "vit-tiny, resnet18 or timm:<name> (no weights downloaded).")
    width: int = option(64, TRAIN, "Width of the own image encoders (ViT dim = 2 x width).",
                        ge=1)
    embed_dim: int = option(128, TRAIN, "Size of the shared image/expression embedding.", ge=1)
    prediction_weight: float = option(
        1.0, TRAIN, "Weight of the expression-prediction loss beside the contrastive one.", ge=0)
    augment: bool = option(True, TRAIN, "Random flips and transposes of each patch.")
    seed: int = option(0, TRAIN, "Seed of the model init and the data order.")
    num_workers: int = option(0, TRAIN, "DataLoader workers.", ge=0)
    checkpoint_every: int = option(100, TRAIN, "Checkpoint every this many optimizer steps.",
                                   ge=1)
    log_every: int = option(10, TRAIN, "Log metrics every this many optimizer steps.", ge=1)
    max_steps: int | None = option(  # a pause, not the end: --resume continues
        None, TRAIN, "Pause (checkpointed) at this step.", ge=0, default_text="run every epoch")

    def __post_init__(self) -> None:
        check_fields(self)


TRAIN_OPTIONS = specs_of(TrainConfig)
