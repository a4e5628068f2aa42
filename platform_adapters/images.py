"""A platform's own image of the section, in its native frame: what automatic registration aligns.

Why: a bundle without a transform to its H&E still holds an image whose frame it knows:

- Visium / Visium HD: `spatial/tissue_hires_image.png` (else `tissue_lowres_image.png`), an
  H&E (or CytAssist-stained) image scaled by `tissue_{hires,lowres}_scalef` from the
  full-resolution pixels the units are in: image px -> native = diag(1/scalef).
- Xenium: the DAPI image `morphology_focus/ch0000_dapi.ome.tif` (Xenium Onboard Analysis >= 2),
  else `morphology_focus.ome.tif` / `morphology_mip.ome.tif` (1.x), pyramidal OME-TIFFs in
  morphology pixels of `pixel_size` um (experiment.xenium): image px -> um = diag(pixel_size).
- MERSCOPE: `images/mosaic_DAPI_z{n}.tif` (the middle plane), placed by
  `images/micron_to_mosaic_pixel_transform.csv` (um -> mosaic px): image px -> um = its inverse.

CosMx keeps one image per field of view with no stitched mosaic: not supported (use landmarks).
Images are read at a reduced size (a pyramid level, then block means), never whole at level 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from histmol.errors import BundleError, RegistrationError
from histmol.section import Section

Modality = Literal["he", "nuclei"]
HE_PLATFORMS = ("visium", "visium-hd")
XENIUM_IMAGES = (
    "morphology_focus/ch0000_dapi.ome.tif",
    "morphology_focus.ome.tif",
    "morphology_mip.ome.tif",
)


@dataclass(frozen=True)
class PlatformImage:
    """The image (RGB uint8 or 2-D), its pixels -> native frame affine, and what it shows."""

    path: Path
    image: np.ndarray
    image_to_native: np.ndarray
    modality: Modality


def platform_image(section: Section, max_side: int = 2048) -> PlatformImage:
    """The section's own image at most `max_side` px on its longer side, placed in its frame.

    Raises:
        RegistrationError: the platform keeps no usable image (named, with the landmarks hint).
        BundleError: the image or the file placing it is missing or unreadable.
    """
    folder = Path(section.provenance.bundle)
    if section.platform in HE_PLATFORMS:
        return _tenx_image(section, max_side)
    if section.platform == "xenium":
        return _xenium_image(folder, max_side)
    if section.platform == "merscope":
        return _merscope_image(folder, max_side)
    raise RegistrationError(
        f"{folder}: automatic registration needs the platform's own image, and {section.platform} "
        "bundles keep none that histmol can place; give --landmarks or --transform"
    )


def _tenx_image(section: Section, max_side: int) -> PlatformImage:
    scalefactors = next(
        (Path(f) for f in section.provenance.files if Path(f).name == "scalefactors_json.json"),
        None,
    )
    if scalefactors is None:
        raise BundleError(section.provenance.bundle, "no scalefactors_json.json was read")
    factors = json.loads(scalefactors.read_text())
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        path = scalefactors.parent / name
        if path.exists() and key in factors:
            image, factor = _read_png(path, max_side)
            scale = factor / float(factors[key])
            return PlatformImage(path, image, np.diag([scale, scale, 1.0]), "he")
    raise BundleError(
        scalefactors.parent,
        "holds neither tissue_hires_image.png nor tissue_lowres_image.png (with their scale "
        "factors): automatic registration has no image to align; give --landmarks",
    )


def _xenium_image(folder: Path, max_side: int) -> PlatformImage:
    experiment = folder / "experiment.xenium"
    path = next((folder / name for name in XENIUM_IMAGES if (folder / name).exists()), None)
    if path is None:
        raise BundleError(folder, f"holds no morphology image ({', '.join(XENIUM_IMAGES)})")
    try:
        pixel_size = float(json.loads(experiment.read_text())["pixel_size"])
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(experiment, f"cannot read pixel_size: {err}") from err
    image, factor = _read_tiff(path, max_side)
    scale = pixel_size * factor
    return PlatformImage(path, image, np.diag([scale, scale, 1.0]), "nuclei")


def _merscope_image(folder: Path, max_side: int) -> PlatformImage:
    images = folder / "images" if (folder / "images").is_dir() else folder
    planes = sorted(images.glob("mosaic_DAPI_z*.tif"))
    if not planes:
        raise BundleError(images, "holds no mosaic_DAPI_z*.tif")
    transform_file = images / "micron_to_mosaic_pixel_transform.csv"
    try:
        micron_to_mosaic = np.loadtxt(transform_file).reshape(3, 3)
    except (OSError, ValueError) as err:
        raise BundleError(transform_file, f"cannot read the um -> mosaic transform: {err}") from err
    path = planes[len(planes) // 2]
    image, factor = _read_tiff(path, max_side)
    to_native = np.linalg.inv(micron_to_mosaic) @ np.diag([factor, factor, 1.0])
    return PlatformImage(path, image, to_native, "nuclei")


def _read_png(path: Path, max_side: int) -> tuple[np.ndarray, float]:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = np.asarray(opened.convert("RGB"))
    except OSError as err:
        raise BundleError(path, f"cannot read image: {err}") from err
    return _shrink(image, max_side)


def _read_tiff(path: Path, max_side: int) -> tuple[np.ndarray, float]:
    """The smallest pyramid level at least `max_side` on its longer side, then block means."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            levels = list(series.levels)
            level0 = max(levels[0].shape[-2:])
            chosen = levels[0]
            for level in levels[1:]:
                if max(level.shape[-2:]) >= max_side:
                    chosen = level
            image = np.asarray(chosen.asarray())
    except (OSError, ValueError, IndexError) as err:
        raise BundleError(path, f"cannot read image: {err}") from err
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3 and image.shape[-1] not in (3, 4):  # channels or planes first: the first
        image = image[0]
    shrunk, factor = _shrink(image, max_side)
    return shrunk, factor * level0 / max(image.shape[:2])


def _shrink(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Block means so the longer side is <= `max_side`; (image, original px per new px)."""
    factor = max(1, int(np.ceil(max(image.shape[:2]) / max_side)))
    if factor == 1:
        return image, 1.0
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, *image.shape[2:])
    return blocks.mean(axis=(1, 3)).astype(image.dtype), float(factor)
