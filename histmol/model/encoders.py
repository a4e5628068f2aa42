"""Image and expression encoders, built from scratch (no weights are ever downloaded).

Image encoders: ``vit-tiny`` (a small ViT, Dosovitskiy et al. 2021), ``resnet18`` (He et al.
2016, BasicBlock [2, 2, 2, 2]) and ``timm:<name>`` (any backbone of an installed timm, created
with ``pretrained=False, num_classes=0``; https://huggingface.co/docs/timm/reference/models).
Each maps a float (B, 3, H, W) batch in [0, 1] to (B, out_dim) features.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from histmol.errors import ConfigError

IMAGE_ENCODERS = ("vit-tiny", "resnet18", "timm:<name>")
_MEAN, _STD = 0.5, 0.25  # H&E pixels in [0, 1] to roughly zero mean, unit spread


class ViT(nn.Module):
    """A small ViT: 8 x 8 grid of patch tokens, a class token, pre-norm transformer blocks."""

    def __init__(self, patch_px: int, *, dim: int = 128, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        if patch_px % 8:
            raise ConfigError(f"vit-tiny needs patch_px divisible by 8, got {patch_px}")
        token = patch_px // 8
        self.embed = nn.Conv2d(3, dim, kernel_size=token, stride=token)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token features (B, dim)."""
        tokens = self.embed((x - _MEAN) / _STD).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.blocks(tokens)[:, 0])


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]), widths scaled by `width` / 64."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for i, cout in enumerate(widths):
            blocks += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features (B, 8 x width)."""
        return self.blocks(self.stem((x - _MEAN) / _STD)).mean(dim=(2, 3))


class _Timm(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        import timm  # optional dependency, checked by the caller

        self.net = timm.create_model(name, pretrained=False, num_classes=0)
        self.out_dim = int(self.net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - _MEAN) / _STD)


def image_encoder(name: str, patch_px: int, *, width: int = 64) -> nn.Module:
    """Build the named image encoder (see the module docstring); `width` scales the own ones."""
    if name == "vit-tiny":
        return ViT(patch_px, dim=2 * width)
    if name == "resnet18":
        return ResNet18(width)
    if name.startswith("timm:") and len(name) > 5:
        if importlib.util.find_spec("timm") is None:
            raise ConfigError(f"image encoder {name!r} needs timm, which is not installed")
        return _Timm(name[5:])
    raise ConfigError(f"image encoder must be one of {IMAGE_ENCODERS}, got {name!r}")


class ExpressionEncoder(nn.Module):
    """MLP over normalised expression and the panel mask (unmeasured genes read as 'unknown')."""

    def __init__(self, n_genes: int, out_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * n_genes, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embed (B, G) normalised expression given the (B, G) panel mask."""
        m = mask.to(x.dtype)
        return self.net(torch.cat([x * m, m], dim=1))
