"""The CLIP-style patch/expression model and its losses.

Contrastive: symmetric InfoNCE between L2-normalised patch and expression embeddings with a
learned temperature (Radford et al. 2021, CLIP). Prediction: a linear head from the patch
features to log1p-normalised expression, with a masked MSE in which genes the section's panel
never measured do not count. Normalisation: ``log1p(counts / total * 1e4)`` over the emitted
genes (scanpy ``normalize_total`` + ``log1p``, as `histmol.data.genes` ranks ``hvg:K``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histmol.model.encoders import ExpressionEncoder, image_encoder

TARGET_SUM = 1e4


def normalise_expression(counts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log1p(counts / total * 1e4) over measured genes; a pair with no counts stays 0."""
    counts = counts.float() * mask
    total = counts.sum(dim=1, keepdim=True)
    return torch.log1p(torch.where(total > 0, counts / total.clamp_min(1e-12) * TARGET_SUM,
                                   torch.zeros_like(counts)))


@dataclass(frozen=True)
class ModelConfig:
    """What fixes the architecture: saved with every checkpoint to rebuild the model."""

    n_genes: int
    patch_px: int
    image_encoder: str = "vit-tiny"
    width: int = 64
    embed_dim: int = 128

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for the checkpoint."""
        return asdict(self)


class HistMolCLIP(nn.Module):
    """Patch encoder + expression encoder into one embedding space, plus an expression head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image = image_encoder(config.image_encoder, config.patch_px, width=config.width)
        self.image_proj = nn.Linear(self.image.out_dim, config.embed_dim)
        self.expression = ExpressionEncoder(config.n_genes, config.embed_dim)
        self.head = nn.Linear(self.image.out_dim, config.n_genes)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features for evaluation (before the projection)."""
        return self.image(patches)

    def forward(self, patches: torch.Tensor, expression: torch.Tensor,
                mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embeddings, logits and losses for one batch of raw counts."""
        target = normalise_expression(expression, mask)
        features = self.image(patches)
        z_image = F.normalize(self.image_proj(features), dim=-1)
        z_expr = F.normalize(self.expression(target, mask), dim=-1)
        contrastive = info_nce(z_image, z_expr, self.logit_scale.clamp(max=math.log(100)).exp())
        prediction = masked_mse(self.head(features), target, mask)
        return {"z_image": z_image, "z_expression": z_expr, "contrastive": contrastive,
                "prediction": prediction}


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` matches row i of `b`, every other row is a negative."""
    logits = scale * a.float() @ b.float().T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over measured (pair, gene) entries only; 0 when none is measured."""
    m = mask.to(torch.float32)
    return ((prediction.float() - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)
