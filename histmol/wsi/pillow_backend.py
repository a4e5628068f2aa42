"""Pillow backend: the plain JPEG/PNG images of legacy ST."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from histmol.errors import WSIError
from histmol.wsi.base import SlideReader, _composite_on_white
from histmol.wsi.mpp import (
    mpp_from_pillow_info,
)

logger = logging.getLogger(__name__)


class PillowReader(SlideReader):
    """Pillow backend for plain JPEG/PNG (legacy ST images, a few thousand px).

    One level, decoded once at open and then sliced without a lock. PIL's global image-size
    limit and truncated-image setting are left untouched; images past its limit are refused.
    """

    backend = "pillow"

    def __init__(self, path: Path) -> None:
        try:
            with Image.open(path, formats=["JPEG", "PNG"]) as image:
                image.load()  # decodes now, so a truncated file fails here
                mpp = mpp_from_pillow_info(image.info, image.format)
                orientation = image.getexif().get(0x0112)
                array = _pillow_rgb(path, image)
        except WSIError:
            raise
        except Image.DecompressionBombError as exc:
            raise WSIError(
                path, f"too large for the plain-image backend ({exc}); convert it to a tiled TIFF"
            ) from exc
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
