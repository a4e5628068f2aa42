"""OpenSlide backend: vendor formats and generic tiled TIFF (their plain levels read from tiles)."""

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
from histmol.wsi.tiff_tiles import TileCache, tile_levels

# TIFF-based formats whose levels are plain top-level tiled pages of the file
TILE_VENDORS = ("generic-tiff", "aperio")


class OpenSlideReader(SlideReader):
    """OpenSlide backend; OpenSlide handles are thread-safe, so reads take no lock.

    OpenSlide places a level>0 region at level-0 coordinates; x * downsample is rounded to the
    nearest level-0 pixel. Where a level's downsample is not an integer (e.g. 2.0005 in Aperio
    files whose level sizes were rounded), OpenSlide then resamples by the remaining sub-pixel
    offset (at most 0.5 / downsample level px), so such levels are not bit-exact crops.

    Levels of generic TIFF and Aperio files that are plain tiled pages (see
    histmol.wsi.tiff_tiles) are read from their tiles, each decoded once: the same pixels,
    without OpenSlide's RGBA round trip per region.
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
            self._tiles: TileCache | None = None
            _check_openslide_tiff_complete(path)
            if vendor in TILE_VENDORS:
                self._tiles = _tile_cache(path, self.level_dimensions)
            self._read_inside(self.level_count - 1, 0, 0, 1, 1)  # a broken tile fails at open
        except BaseException:
            if getattr(self, "_tiles", None) is not None:
                self._tiles.close()
            slide.close()
            raise

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._tiles is not None and level in self._tiles.levels:
            try:
                return self._tiles.read(level, x, y, width, height)
            except Exception as exc:  # decoder errors on a damaged tile: name the file
                raise WSIError(
                    self.path, f"cannot decode level {level} at ({x}, {y}): {exc}"
                ) from exc
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
        if self._tiles is not None:
            self._tiles.close()
        self._slide.close()


def _tile_cache(path: Path, level_dimensions: tuple[tuple[int, int], ...]) -> TileCache | None:
    """A tile reader for the levels tifffile can serve exactly, or None when there is none."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            levels = tile_levels(tif, level_dimensions)
    except Exception:  # tifffile cannot parse what OpenSlide opened: OpenSlide reads it all
        return None
    return TileCache(path, levels) if levels else None
