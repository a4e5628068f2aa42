"""Build options that decide a section's output bytes, and their fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from histmol.errors import ConfigError
from histmol.section import TilingMode

Resample = Literal["lanczos", "bilinear", "box"]
Register = Literal["given", "auto"]
CORPUS_LEVEL_FIELDS = ("patch_px", "target_mpp", "resample", "jpeg_quality")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that changes what a build writes. Worker counts are not here on purpose.

    `mode=None` takes the platform's default tiling mode. `mpp=None` resolves the pixel size
    from the WSI file, the bundle's scalefactors or the unit pitch, in that order.
    `register="auto"` finds native -> WSI from the platform's own image (histmol.autoregister)
    and fails the section under `min_register_confidence`; "given" uses the adapter's alignment,
    --transform or --landmarks.
    """

    patch_px: int = 224
    target_mpp: float = 0.5
    mode: TilingMode | None = None
    mpp: float | None = None
    mpp_tolerance: float = 0.05
    min_tissue_fraction: float | None = None  # None: assay marks, else 0.1 (histmol.tissue)
    min_units_on_tissue: float = 0.5
    tissue_mpp: float = 8.0
    resample: Resample = "lanczos"
    jpeg_quality: int = 90
    pairs_per_shard: int = 2048
    min_match_rate: float = 0.9
    max_landmark_residual_um: float = 50.0
    register: Register = "given"
    min_register_confidence: float = 0.3

    def __post_init__(self) -> None:
        if not 16 <= self.patch_px <= 4096:
            raise ConfigError(f"patch_px must be in 16..4096, got {self.patch_px}")
        if not 0.05 <= self.target_mpp <= 50:
            raise ConfigError(f"target_mpp must be in 0.05..50 um/px, got {self.target_mpp}")
        if self.mpp is not None and not 0.05 <= self.mpp <= 50:
            raise ConfigError(f"mpp override must be in 0.05..50 um/px, got {self.mpp}")
        if self.mode not in (None, "spot", "grid"):
            raise ConfigError(f"mode must be 'spot' or 'grid', got {self.mode!r}")
        if self.min_tissue_fraction is not None and not 0 <= self.min_tissue_fraction <= 1:
            raise ConfigError("min_tissue_fraction must be in 0..1")
        if not 0 <= self.min_units_on_tissue <= 1:
            raise ConfigError("min_units_on_tissue must be in 0..1")
        if not 0 < self.mpp_tolerance < 1:
            raise ConfigError("mpp_tolerance must be in (0, 1)")
        if self.resample not in ("lanczos", "bilinear", "box"):
            raise ConfigError(f"resample must be lanczos, bilinear or box, got {self.resample!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("jpeg_quality must be in 1..100")
        if self.pairs_per_shard < 1:
            raise ConfigError("pairs_per_shard must be >= 1")
        if not self.max_landmark_residual_um > 0:
            raise ConfigError("max_landmark_residual_um must be > 0")
        if not 0 < self.min_match_rate <= 1:
            raise ConfigError("min_match_rate must be in (0, 1]")
        if self.register not in ("given", "auto"):
            raise ConfigError(f"register must be 'given' or 'auto', got {self.register!r}")
        if not -1 <= self.min_register_confidence <= 1:
            raise ConfigError("min_register_confidence must be in -1..1 (a correlation)")

    def corpus_fields(self) -> dict[str, Any]:
        """The options every section of one corpus must share: the patch geometry and codec.

        Per-section options (mode, mpp, tissue threshold, ...) live in each section's row.
        """
        return {key: getattr(self, key) for key in CORPUS_LEVEL_FIELDS}

    def with_overrides(self, **changes: Any) -> BuildConfig:
        """A copy with the given fields changed; None values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    def fingerprint(self) -> str:
        """Stable hash of the options: equal configs build equal bytes."""
        payload = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
