"""`--register auto`: find native -> WSI from the platform's own image, or refuse with the score.

Why: the registration itself (`histmol.autoregister`) is pure; this stage does the reading around
it: the platform's image from the bundle (`platform_adapters.images`), a WSI level near that
image's pixel size (the WSI's own thumbnail, never level 0), the expected scale when both pixel
sizes are known, the threshold, and the QC numbers and overlay figure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histmol.autoregister import AutoRegistration, autoregister
from histmol.errors import RegistrationError
from histmol.section import Section
from histmol.wsi import SlideReader

log = logging.getLogger(__name__)
MIN_SIDE, MAX_SIDE = 256, 2048


@dataclass(frozen=True)
class AutoPlacement:
    """The found transform, its QC numbers, and the images it was found on (for the figure)."""

    native_to_wsi: np.ndarray
    qc: dict[str, float | int | str | bool]
    found: AutoRegistration
    fixed: np.ndarray
    moving: np.ndarray


def place_automatically(
    section: Section,
    slide: SlideReader,
    *,
    wsi_mpp: float | None,
    min_confidence: float,
    figure_dir: Path | None = None,
) -> AutoPlacement:
    """Register the section's own image to the slide; fail below `min_confidence`.

    `wsi_mpp` (the user's or the file's) with the bundle's own scale fixes the scale; without it
    the scale is searched. `figure_dir` receives `registration.png` (the overlay) pass or fail.
    """
    from platform_adapters.images import platform_image

    started = time.perf_counter()
    own = platform_image(section)
    height, width = own.image.shape[:2]
    image_um = _image_um_per_px(section, own.image_to_native)
    slide_w, slide_h = slide.dimensions
    if wsi_mpp is not None and image_um is not None:
        side = int(np.clip(max(slide_w, slide_h) * wsi_mpp / image_um, MIN_SIDE, MAX_SIDE))
    else:
        side = 1024
    fixed, thumb_scale = slide.thumbnail(side)
    fixed_to_wsi = np.diag([thumb_scale, thumb_scale, 1.0])
    scale = None
    if wsi_mpp is not None and image_um is not None:
        scale = image_um / (wsi_mpp * thumb_scale)  # fixed px per moving px
    found = autoregister(
        own.image, own.image_to_native, fixed, fixed_to_wsi, modality=own.modality, scale=scale
    )
    qc: dict[str, float | int | str | bool] = {
        "register": "auto",
        "register_image": own.path.name,
        "register_modality": own.modality,
        "register_confidence": found.confidence,
        "register_min_confidence": min_confidence,
        "register_seconds": time.perf_counter() - started,
        "register_scale_searched": scale is None,
    }
    qc.update({f"register_{k}": v for k, v in found.metrics.items()})
    placement = AutoPlacement(found.native_to_wsi, qc, found, fixed, own.image)
    if figure_dir is not None:
        from histmol.qc.registration_figure import write_registration_figure

        write_registration_figure(placement, figure_dir / "registration.png", title=own.path.name)
    if found.confidence < min_confidence:
        raise RegistrationError(
            f"{own.path}: automatic registration to {slide.path.name} is not trustworthy: "
            f"confidence {found.confidence:.3f} (band-passed correlation; tissue-mask Dice "
            f"{found.metrics['mask_dice']:.2f}) is under {min_confidence:g}; nothing was "
            "placed. Give --landmarks (point pairs) or --transform"
        )
    log.info("%s: registered %s, confidence %.3f", section.section_id, own.path.name,
             found.confidence)
    return placement


def _image_um_per_px(section: Section, image_to_native: np.ndarray) -> float | None:
    """Micrometres per pixel of the platform's image, when the bundle states its scale."""
    if section.native_um_per_unit is None:
        return None
    return float(section.native_um_per_unit * np.sqrt(abs(np.linalg.det(image_to_native[:2, :2]))))
