"""OpenSlide backend: vendor formats and generic tiled TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from histmol.errors import WSIError
from histmol.wsi.base import SlideReader, _composite_on_white
from histmol.wsi.mpp import (
    mpp_from_openslide,
)
from histmol.wsi.tiff_checks import _check_openslide_tiff_complete


class OpenSlideReader(SlideReader):
    """OpenSlide backend; OpenSlide handles are thread-safe, so reads take no lock.

    OpenSlide places a level>0 region at level-0 coordinates; x * downsample is rounded to the
    nearest level-0 pixel. Where a level's downsample is not an integer (e.g. 2.0005 in Aperio
    files whose level sizes were rounded), OpenSlide then resamples by the remaining sub-pixel
    offset (at most 0.5 / downsample level px), so such levels are not bit-exact crops.
    """

    backend = "openslide"

    def __init__(self, path: Path, vendor: str | None = None) -> None:
        try:
            slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise WSIError(
                path, f"OpenSlide recognises it as {vendor!r} but cannot open it: {exc}"
            ) from exc
        try:
            self.properties = dict(slide.properties)
            self.vendor = vendor
            mpp = mpp_from_openslide(self.properties)
            super().__init__(path, slide.level_dimensions, slide.level_downsamples, mpp)
            self._slide = slide
            _check_openslide_tiff_complete(path)
            self._read_inside(self.level_count - 1, 0, 0, 1, 1)  # a broken tile fails at open
        except BaseException:
            slide.close()
            raise

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        location = (x, y) if level == 0 else (round(x * downsample), round(y * downsample))
        try:
            image = self._slide.read_region(location, level, (width, height))
        except openslide.OpenSlideError as exc:
            raise WSIError(
                self.path, f"OpenSlide cannot read level {level} at ({x}, {y}): {exc}"
            ) from exc
        return _composite_on_white(np.asarray(image))

    def _close(self) -> None:
        self._slide.close()
