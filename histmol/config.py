"""Build options that decide a section's output bytes, and their fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from histmol.options import CORPUS, SECTION, check_fields, option, scoped, specs_of

TilingMode = Literal["spot", "grid"]
Resample = Literal["lanczos", "bilinear", "box"]
Register = Literal["given", "auto"]


@dataclass(frozen=True)
class BuildConfig:
    """Everything that changes what a build writes. Worker counts are not here on purpose.

    Each field is declared once, with its bounds and help (histmol.options): the manifest's
    models and the `histmol build` options are derived from these declarations.
    `mode=None` takes the platform's default tiling mode. `mpp=None` resolves the pixel size
    from the WSI file, the bundle's scalefactors or the unit pitch, in that order.
    `register="auto"` finds native -> WSI from the platform's own image (histmol.autoregister)
    and fails the section under `min_register_confidence`; "given" uses the adapter's alignment,
    --transform or --landmarks.
    """

    patch_px: int = option(224, CORPUS, "Patch side in pixels.", ge=16, le=4096)
    target_mpp: float = option(0.5, CORPUS, "Patch resolution in um/px.", ge=0.05, le=50)
    mode: TilingMode | None = option(None, SECTION, "Tiling mode.", default_text="the platform's")
    mpp: float | None = option(
        None, SECTION, "Override the WSI's um/px (skips the pitch check).", ge=0.05, le=50,
        default_text="from the WSI file, the bundle's scalefactors or the unit pitch")
    mpp_tolerance: float = option(
        0.05, SECTION, "Allowed mpp disagreement with the unit pitch.", gt=0, lt=1)
    min_tissue_fraction: float | None = option(  # None: assay marks, else 0.1 (histmol.tissue)
        None, SECTION, "Drop patches under this tissue fraction (spots the bundle marks under "
        "tissue are kept, only flagged, unless this is given).", ge=0, le=1, default_text="0.1")
    min_units_on_tissue: float = option(
        0.5, SECTION, "Fail when fewer unit centres lie on tissue.", ge=0, le=1)
    tissue_mpp: float = option(8.0, SECTION, "Resolution of the tissue mask in um/px.", gt=0)
    resample: Resample = option("lanczos", CORPUS, "Resampling filter.")
    jpeg_quality: int = option(90, CORPUS, "JPEG quality of stored patches.", ge=1, le=100)
    pairs_per_shard: int = option(2048, SECTION, "Pairs per shard part.", ge=1)
    min_match_rate: float = option(0.9, SECTION, "Minimum barcode match rate.", gt=0, le=1)
    max_landmark_residual_um: float = option(
        50.0, SECTION, "Fail when a landmark misses by more than this (um).", gt=0)
    register: Register = option(
        "given", SECTION, "auto: align the bundle's own image (Visium PNG, DAPI) to the H&E; "
        "given: the transform, landmarks or the platform's alignment.")
    min_register_confidence: float = option(
        0.3, SECTION, "Fail an automatic registration scoring less than this (a correlation).",
        ge=-1, le=1)

    def __post_init__(self) -> None:
        check_fields(self)

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


BUILD_OPTIONS = specs_of(BuildConfig)
CORPUS_LEVEL_FIELDS = tuple(spec.name for spec in scoped(BUILD_OPTIONS, CORPUS))
