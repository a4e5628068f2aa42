"""Region reads from a TIFF pyramid's tiles, each tile decoded once and reused by later reads.

Why: patches are cut in raster order and overlap each other and their neighbours' tiles, but
OpenSlide's `read_region` decodes into RGBA, un-premultiplies, copies into a PIL image and then
through numpy again for every patch; half the CPU of a spot build went there. Here a tile's
compressed bytes are read with `os.pread` (no shared file position, so no lock), decoded once by
tifffile's own decoder for that page (the same libjpeg-turbo that writes and reads the corpus),
kept in a byte-bounded LRU cache, and windows are copied straight out of the decoded tiles.

Only levels whose pixels are, by construction, what OpenSlide returns are served here: tiled,
8-bit, 3-sample contiguous RGB/YCbCr pages, compressed losslessly or as baseline JPEG, at level 0
or an exact integer downsample (OpenSlide resamples a region of a level with a non-integer
downsample by its sub-pixel offset, see OpenSlideReader). Anything else stays with OpenSlide.
The tifffile backend serves the same kind of pages (OME-TIFF and SubIFD levels) from tiles too,
instead of decoding whole levels or reading through zarr under a lock.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHE_BYTES = 64 * 1024 * 1024  # decoded tiles kept: a band of a 24k px slide's level 1
# baseline JPEG, none, LZW, Adobe deflate, deflate: decoded by tifffile exactly as libtiff does
DECODABLE = {7, 1, 5, 8, 32946}


class TileLevel:
    """One pyramid level stored as a tiled TIFF page, read tile by tile."""

    def __init__(self, page: Any) -> None:
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        self.across = -(-self.width // self.tile_w)
        self.offsets = tuple(int(v) for v in page.dataoffsets)
        self.counts = tuple(int(v) for v in page.databytecounts)
        self.jpegtables = page.jpegtables
        self._decode = page.decode

    def decode(self, data: bytes, index: int) -> np.ndarray:
        """(tile_h, tile_w, 3) uint8 pixels of tile `index` from its compressed bytes."""
        tile, _, _ = self._decode(data, index, jpegtables=self.jpegtables)
        tile = tile.reshape(tile.shape[-3:])  # (1, h, w, 3) from tifffile: the plane
        if tile.shape == (self.tile_h, self.tile_w, 3):
            return tile
        # an edge tile some writers store cut to the image: only its stored part is ever read
        full = np.full((self.tile_h, self.tile_w, 3), 255, dtype=np.uint8)
        full[: tile.shape[0], : tile.shape[1]] = tile[: self.tile_h, : self.tile_w]
        return full


def series_tile_levels(series: Any) -> dict[int, TileLevel]:
    """The levels of a tifffile series (Y, X, samples axes) whose single page reads from tiles."""
    if series.axes != "YXS":
        return {}
    levels: dict[int, TileLevel] = {}
    for index, level in enumerate(series.levels):
        if len(level.pages) == 1 and _page_ok(level.keyframe):
            levels[index] = TileLevel(level.keyframe)
    return levels


def tile_levels(
    tif: Any, level_dimensions: Sequence[tuple[int, int]]
) -> dict[int, TileLevel]:
    """The levels (by index) that can be read from tiles: see the module docstring.

    A level qualifies when exactly one top-level page has its dimensions and that page is a
    tiled, 8-bit, 3-sample, contiguous RGB/YCbCr page with a decodable compression and no empty
    tiles, and when the level is level 0 or an exact integer downsample of it in x and y.
    """
    width0, height0 = level_dimensions[0]
    by_size: dict[tuple[int, int], list[Any]] = {}
    for page in tif.pages:
        by_size.setdefault((int(page.imagewidth), int(page.imagelength)), []).append(page)
    levels: dict[int, TileLevel] = {}
    for level, (width, height) in enumerate(level_dimensions):
        pages = by_size.get((width, height), [])
        if len(pages) != 1 or not _page_ok(pages[0]):
            continue
        if level and not (width0 % width == 0 and height0 % height == 0
                          and width0 // width == height0 // height):
            continue
        levels[level] = TileLevel(pages[0])
    return levels


def _page_ok(page: Any) -> bool:
    """Whether tifffile decodes this page's tiles to the RGB pixels OpenSlide would return."""
    return bool(
        page.is_tiled
        and int(page.compression) in DECODABLE
        # RGB, or YCbCr inside JPEG (tifffile cannot upsample raw subsampled YCbCr)
        and (int(page.photometric) == 2 or (int(page.photometric) == 6
                                            and int(page.compression) == 7))
        and int(page.planarconfig) == 1
        and int(page.samplesperpixel) == 3
        and int(page.bitspersample) == 8
        and int(page.imagedepth) == 1
        and page.tiledepth == 1
        and all(count > 0 for count in page.databytecounts)
    )


class TileCache:
    """Windows of tiled levels, decoding each tile once; safe to use from several threads.

    Two threads may decode the same tile at the same moment (both results are equal); the
    lock only guards the LRU bookkeeping, never a read or a decode.
    """

    def __init__(
        self, path: Path, levels: dict[int, TileLevel], cache_bytes: int = CACHE_BYTES
    ) -> None:
        self.path = Path(path)
        self.levels = levels
        self.cache_bytes = cache_bytes
        self._fd = os.open(self.path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._held = 0

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 of a box lying wholly inside `level`."""
        tiled = self.levels[level]
        out = np.empty((height, width, 3), dtype=np.uint8)
        row0, row1 = y // tiled.tile_h, (y + height - 1) // tiled.tile_h
        col0, col1 = x // tiled.tile_w, (x + width - 1) // tiled.tile_w
        for row in range(row0, row1 + 1):
            ty = row * tiled.tile_h
            sy0, sy1 = max(y, ty), min(y + height, ty + tiled.tile_h)
            for col in range(col0, col1 + 1):
                tx = col * tiled.tile_w
                sx0, sx1 = max(x, tx), min(x + width, tx + tiled.tile_w)
                tile = self._tile(level, tiled, row * tiled.across + col)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - ty:sy1 - ty, sx0 - tx:sx1 - tx]
        return out

    def _tile(self, level: int, tiled: TileLevel, index: int) -> np.ndarray:
        key = (level, index)
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        data = os.pread(self._fd, tiled.counts[index], tiled.offsets[index])
        if len(data) != tiled.counts[index]:
            raise OSError(f"{self.path}: tile {index} of level {level} is truncated")
        tile = tiled.decode(data, index)
        tile.setflags(write=False)
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = tile
                self._held += tile.nbytes
                while self._held > self.cache_bytes and len(self._tiles) > 1:
                    _, dropped = self._tiles.popitem(last=False)
                    self._held -= dropped.nbytes
        return tile

    def close(self) -> None:
        """Drop the cached tiles and close the file descriptor."""
        with self._lock:
            self._tiles.clear()
            self._held = 0
        os.close(self._fd)
