"""Pillow backend: the plain JPEG/PNG images of legacy ST."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin

from histmol.errors import WSIError
from histmol.wsi.base import SlideReader, _composite_on_white
from histmol.wsi.mpp import (
    mpp_from_pillow_info,
)

logger = logging.getLogger(__name__)


# histmol's own limit for a plain image decoded whole into memory (3 bytes a pixel: ~3 GiB);
# larger H&E belongs in a tiled TIFF. Pillow's global MAX_IMAGE_PIXELS (and its warning) is
# neither used nor changed: the size is read from the header before anything is decoded.
MAX_PLAIN_IMAGE_PIXELS = 1 << 30
_SIGNATURES = (
    (b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile),
    (b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile),
)


def open_plain_image(path: Path, max_pixels: int = MAX_PLAIN_IMAGE_PIXELS) -> Image.Image:
    """Open a JPEG/PNG lazily (header only) and refuse it, naming its size, past `max_pixels`.

    Uses the format's ImageFile class directly: `PIL.Image.open` would apply Pillow's global
    decompression-bomb check (a warning past 89 Mpx, an error past twice that).
    """
    with open(path, "rb") as handle:
        head = handle.read(8)
    for signature, factory in _SIGNATURES:
        if head.startswith(signature):
            image = factory(str(path))
            break
    else:
        raise WSIError(path, "not a JPEG or PNG file (its first bytes say otherwise)")
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise WSIError(
            path,
            f"{width} x {height} px ({width * height * 3 / 2**30:.1f} GiB decoded) is past "
            f"histmol's limit of {max_pixels / 1e6:,.0f} Mpx for plain images, which are decoded "
            "whole; convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)",
        )
    return image


class PillowReader(SlideReader):
    """Pillow backend for plain JPEG/PNG (legacy ST images, a few thousand px).

    One level, decoded once at open and then sliced without a lock. PIL's global image-size
    limit and truncated-image setting are left untouched; histmol checks the size itself
    (`open_plain_image`), from the header, before decoding.
    """

    backend = "pillow"

    def __init__(self, path: Path) -> None:
        try:
            with open_plain_image(path) as image:
                image.load()  # decodes now, so a truncated file fails here
                mpp = mpp_from_pillow_info(image.info, image.format)
                orientation = image.getexif().get(0x0112)
                array = _pillow_rgb(path, image)
        except WSIError:
            raise
        except (OSError, SyntaxError, ValueError) as exc:
            raise WSIError(path, f"cannot decode the image (truncated or corrupt?): {exc}") from exc
        if orientation not in (None, 1):
            logger.warning(
                "%s: EXIF Orientation %s is ignored; pixels are read as stored", path, orientation
            )
        array.setflags(write=False)
        self._array: np.ndarray | None = array
        height, width = array.shape[:2]
        super().__init__(path, [(width, height)], [1.0], mpp)

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        array = self._array
        if array is None:
            raise WSIError(self.path, "the slide reader is closed")
        return array[y : y + height, x : x + width].copy()

    def _close(self) -> None:
        self._array = None


def _pillow_rgb(path: Path, image: Image.Image) -> np.ndarray:
    """RGB uint8 of a decoded image; alpha composited onto white; grey and 16-bit refused."""
    mode = image.mode
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode in ("RGBA", "RGBa", "RGBX"):
        return _composite_on_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    found = f"Pillow mode {mode}, {image.width} x {image.height}"
    if mode in ("1", "L", "LA", "La"):
        problem = f"single-channel (greyscale) image ({found})"
    elif mode.startswith("I") or mode == "F":
        problem = f"not an 8-bit image ({found})"
    else:
        problem = f"not an RGB image ({found})"
    raise WSIError(path, f"{problem}; only 8-bit RGB H&E is supported")
