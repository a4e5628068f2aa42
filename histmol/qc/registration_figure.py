"""The automatic-registration QC figure: the two images after alignment, and the confidence.

Why: a curator accepts or rejects an automatic registration by eye. Written by the build (pass
or fail) to ``<corpus>/qc/<section_id>/registration.png``, beside the figures `histmol qc`
writes: the H&E level it was registered on, the platform's image resampled into that frame, and
both overlaid (H&E tissue in green, the platform's signal in magenta: aligned tissue is grey or
white, misalignment shows as coloured fringes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from histmol.shards.atomic import temp_name

FIGURE_SIDE = 600  # px per panel: enough to judge the overlay, cheap to draw

if TYPE_CHECKING:
    from histmol.autoregister import AutoPlacement


def registration_figure(placement: AutoPlacement, title: str = "") -> Figure:
    """Three panels: the H&E, the platform image in the H&E's frame, their overlay."""
    from histmol.autoregister import (
        he_signal,
        hematoxylin_signal,
        nuclear_stain_signal,
        resample,
    )

    found = placement.found
    step = max(1, int(np.ceil(max(placement.fixed.shape[:2]) / FIGURE_SIDE)))
    fixed = placement.fixed[::step, ::step]
    moving = placement.moving
    he = placement.qc.get("register_modality", "he") == "he"
    moving_signal = he_signal(moving) if he else nuclear_stain_signal(moving)
    fixed_signal = he_signal(fixed) if he else hematoxylin_signal(fixed)
    to_shown = np.diag([1.0 / step, 1.0 / step, 1.0]) @ found.moving_to_fixed
    warped = resample(moving_signal, to_shown, fixed.shape[:2])
    figure = Figure(figsize=(12, 4.4), dpi=100)
    axes = figure.subplots(1, 3)
    axes[0].imshow(fixed)
    axes[0].set_title("H&E (registration level)")
    shown = np.where(np.isfinite(warped), warped, 0.0)
    axes[1].imshow(shown, cmap="gray" if he else "magma")
    axes[1].set_title("platform image, aligned")
    axes[2].imshow(_overlay(fixed_signal, warped))
    axes[2].set_title("overlay: H&E green, platform magenta")
    for ax in axes:
        ax.set_axis_off()
    confidence = found.confidence
    threshold = float(placement.qc.get("register_min_confidence", 0.0))
    verdict = "PASS" if confidence >= threshold else "FAIL: give --landmarks"
    figure.suptitle(
        f"{title}  confidence {confidence:.3f} (min {threshold:g}) {verdict}; "
        f"mask Dice {found.metrics['mask_dice']:.2f}, rotation "
        f"{found.metrics['rotation_deg']:.1f} deg, flipped {found.metrics['flipped']}",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def write_registration_figure(placement: AutoPlacement, path: Path, title: str = "") -> Path:
    """Draw and write the figure atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    registration_figure(placement, title).savefig(
        tmp, format="png", metadata={"Software": None}, pil_kwargs={"compress_level": 1}
    )
    os.replace(tmp, path)
    return path


def _overlay(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """RGB: fixed in green, moving in red + blue, each scaled to its own 99th percentile."""

    def unit(image: np.ndarray) -> np.ndarray:
        finite = image[np.isfinite(image)]
        top = float(np.percentile(finite, 99)) if finite.size else 1.0
        return np.clip(np.nan_to_num(image) / max(top, 1e-6), 0.0, 1.0)

    f, m = unit(fixed), unit(moving)
    return np.stack([m, f, m], axis=-1)
