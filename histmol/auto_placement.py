"""`--register auto`: find native -> WSI from the platform's own image, or refuse with the score.

Why: the registration itself (`histmol.autoregister`) is pure; this stage does the reading around
it: the platform's image from the bundle (`platform_adapters.images`), a WSI level near that
image's pixel size (the WSI's own thumbnail, never level 0), the expected scale when both pixel
sizes are known, the threshold, and the QC numbers and overlay figure.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from histmol.autoregister import AutoPlacement, autoregister
from histmol.errors import RegistrationError
from histmol.section import Section
from histmol.wsi import SlideReader

log = logging.getLogger(__name__)
COARSE_THUMBNAIL_SIDE = 1024  # pass 1: the whole slide
MAX_FOOTPRINT_SIDE = 2048  # pass 2: the platform image's footprint, at about its pixel size


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
    # pass 1: the whole slide's thumbnail finds rotation, flip, scale and the rough place
    fixed, thumb_scale = slide.thumbnail(COARSE_THUMBNAIL_SIDE)
    fixed_to_wsi = np.diag([thumb_scale, thumb_scale, 1.0])
    scale = None
    if wsi_mpp is not None and image_um is not None:
        scale = image_um / (wsi_mpp * thumb_scale)  # fixed px per moving px
    found = autoregister(
        own.image, own.image_to_native, fixed, fixed_to_wsi, modality=own.modality, scale=scale
    )
    # pass 2: a WSI level near the platform image's pixel size, cropped to its footprint
    image_to_wsi = found.native_to_wsi @ own.image_to_native
    wsi_px_per_image_px = float(np.sqrt(abs(np.linalg.det(image_to_wsi[:2, :2]))))
    passes = 1
    if thumb_scale > 1.25 * wsi_px_per_image_px:
        fixed, fixed_to_wsi = _footprint(slide, image_to_wsi, own.image.shape[:2],
                                         wsi_px_per_image_px)
        initial = np.linalg.inv(fixed_to_wsi) @ image_to_wsi
        found = autoregister(
            own.image, own.image_to_native, fixed, fixed_to_wsi, modality=own.modality,
            scale=scale, initial=initial,
        )
        passes = 2
    qc: dict[str, float | int | str | bool] = {
        "register": "auto",
        "register_image": own.path.name,
        "register_modality": own.modality,
        "register_confidence": found.confidence,
        "register_min_confidence": min_confidence,
        "register_seconds": time.perf_counter() - started,
        "register_scale_searched": scale is None,
        "register_passes": passes,
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


def _footprint(
    slide: SlideReader, image_to_wsi: np.ndarray, shape: tuple[int, int], wsi_px_per_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """The WSI under the platform image's footprint (+10 %), near that image's pixel size.

    Returns the RGB crop and its pixels -> WSI level-0 affine. Reads the pyramid level at or
    below the wanted downsample, then block-averages to it.
    """
    height, width = shape
    corners = image_to_wsi @ np.array([[0, width, 0, width], [0, 0, height, height], [1, 1, 1, 1]])
    low, high = corners[:2].min(axis=1), corners[:2].max(axis=1)
    margin = 0.1 * (high - low)
    slide_w, slide_h = slide.dimensions
    x0, y0 = np.maximum(np.floor(low - margin), 0).astype(int)
    x1 = int(min(np.ceil(high[0] + margin[0]), slide_w))
    y1 = int(min(np.ceil(high[1] + margin[1]), slide_h))
    downsample = max(wsi_px_per_px, max(x1 - x0, y1 - y0) / MAX_FOOTPRINT_SIDE, 1.0)
    level = slide.best_level_for_downsample(downsample)
    level_down = float(slide.level_downsamples[level])
    lx0, ly0 = int(x0 / level_down), int(y0 / level_down)
    lw = max(1, int(np.ceil((x1 - x0) / level_down)))
    lh = max(1, int(np.ceil((y1 - y0) / level_down)))
    crop = slide.read_region(level, lx0, ly0, lw, lh)
    block = max(1, int(downsample / level_down))
    if block > 1:
        h, w = lh // block * block, lw // block * block
        crop = crop[:h, :w].reshape(h // block, block, w // block, block, 3).mean(axis=(1, 3))
        crop = crop.astype(np.uint8)
    px = level_down * block
    to_wsi = np.array([[px, 0.0, lx0 * level_down], [0.0, px, ly0 * level_down], [0, 0, 1.0]])
    return crop, to_wsi


def _image_um_per_px(section: Section, image_to_native: np.ndarray) -> float | None:
    """Micrometres per pixel of the platform's image, when the bundle states its scale."""
    if section.native_um_per_unit is None:
        return None
    return float(section.native_um_per_unit * np.sqrt(abs(np.linalg.det(image_to_native[:2, :2]))))
