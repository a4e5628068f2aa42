"""Streamed writer of JPEG-tiled pyramidal TIFFs that OpenSlide opens with every level.

Why this shape: OpenSlide's generic-TIFF driver only sees a pyramid whose levels are top-level
pages (`subfiletype=1` for reduced ones; SubIFD pyramids open with one level) and only reports
`openslide.mpp-x` when the resolution unit is CENTIMETER. Slides of 26,000 px square (~2 GB raw)
must be writable without holding level 0, so level 0 is rendered one tile row at a time and
handed to tifffile through a generator; each reduced level is built from exact integer sums of
level-0 pixels (kept in RAM or, when large, spooled to a scratch file beside the output), so
level k is the rounded 2^k x 2^k box mean of level 0 and level 0 is rendered only once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

TileSource = Callable[[int, int, int, int], np.ndarray]
"""`tile_source(x, y, w, h)` returns level-0 RGB uint8 pixels of shape (h, w, 3)."""

DEFAULT_DESCRIPTION = "histmol synthetic slide"
_IN_MEMORY_LIMIT = 64 * 2**20  # bytes of level sums kept in RAM before spooling to disk


def pyramid_dims(width: int, height: int, min_level_side: int = 1024) -> list[tuple[int, int]]:
    """Level sizes (w, h): halving (floor) until the longer side drops below `min_level_side`."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    dims = [(width, height)]
    while max(dims[-1]) >= min_level_side and min(dims[-1]) >= 2:
        w, h = dims[-1]
        dims.append((w // 2, h // 2))
    return dims


def _sum_dtype(level: int) -> np.dtype:
    """Smallest unsigned dtype holding the sum of 4**level uint8 values."""
    return np.dtype(np.uint16) if 255 * 4**level < 2**16 else np.dtype(np.uint32)


class _Spool:
    """Rows of one level's 2x2 sums, appended in order and read back in order.

    Kept in RAM when small, else in a scratch file read sequentially (no memory map, so the
    process's resident memory stays at a few strips whatever the slide size).
    """

    def __init__(self, width: int, height: int, level: int, scratch: Path) -> None:
        self.width, self.height, self.dtype = width, height, _sum_dtype(level)
        self.rows = 0
        self._row_bytes = width * 3 * self.dtype.itemsize
        self._chunks: list[np.ndarray] | None = None
        self._file = None
        if self._row_bytes * height <= _IN_MEMORY_LIMIT:
            self._chunks = []
        else:
            self._file = open(scratch / f"level{level}.sums", "w+b")  # noqa: SIM115

    def append(self, rows: np.ndarray) -> None:
        """Add the next rows (n, width, 3) of sums."""
        rows = np.ascontiguousarray(rows, self.dtype)
        if self._chunks is not None:
            self._chunks.append(rows)
        else:
            assert self._file is not None
            self._file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def strips(self, n: int) -> Iterator[np.ndarray]:
        """Yield the rows in strips of `n` (the last may be shorter), then free them."""
        if self.rows != self.height:
            raise RuntimeError(f"level sums hold {self.rows} rows, expected {self.height}")
        if self._chunks is not None:
            data = np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.width, 3))
            self._chunks = None
            for y0 in range(0, self.height, n):
                yield data[y0 : y0 + n]
            return
        assert self._file is not None
        self._file.seek(0)
        for y0 in range(0, self.height, n):
            rows = min(n, self.height - y0)
            buf = self._file.read(rows * self._row_bytes)
            yield np.frombuffer(buf, self.dtype).reshape(rows, self.width, 3)
        self._file.close()

    def close(self) -> None:
        """Release the scratch file, if any."""
        if self._file is not None and not self._file.closed:
            self._file.close()


def _pool2(block: np.ndarray, out_h: int, out_w: int, dtype: np.dtype) -> np.ndarray:
    """Sum 2x2 neighbourhoods of `block` into an (out_h, out_w, 3) array of `dtype`."""
    b = block[: 2 * out_h, : 2 * out_w].astype(dtype, copy=False)
    return b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]


def _tiles_of(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Cut a strip (<= tile rows) into tile x tile blocks, edge-padded (no JPEG ringing)."""
    h, w = strip.shape[:2]
    for x0 in range(0, w, tile):
        block = strip[:, x0 : x0 + tile]
        if block.shape[0] != tile or block.shape[1] != tile:
            pad = ((0, tile - block.shape[0]), (0, tile - block.shape[1]), (0, 0))
            block = np.pad(block, pad, mode="edge")
        yield np.ascontiguousarray(block)


def _level0_tiles(
    tile_source: TileSource,
    width: int,
    height: int,
    tile: int,
    sums_out: _Spool | None,
    workers: int,
) -> Iterator[np.ndarray]:
    """Yield level-0 tiles row by row, rendering strips ahead in threads; fill level-1 sums."""
    starts = list(range(0, height, tile))

    def render(y0: int) -> np.ndarray:
        h = min(tile, height - y0)
        strip = np.asarray(tile_source(0, y0, width, h))
        if strip.shape != (h, width, 3) or strip.dtype != np.uint8:
            raise ValueError(
                f"tile_source(0, {y0}, {width}, {h}) returned {strip.dtype} {strip.shape}, "
                f"expected uint8 {(h, width, 3)}"
            )
        return strip

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = [pool.submit(render, y0) for y0 in starts[:workers]]
        for i in range(len(starts)):
            strip = pending.pop(0).result()
            if i + workers < len(starts):
                pending.append(pool.submit(render, starts[i + workers]))
            if sums_out is not None:
                _accumulate(strip, sums_out)
            yield from _tiles_of(strip, tile)


def _accumulate(strip: np.ndarray, sums_out: _Spool) -> None:
    """Append 2x2 sums of the next `strip` (pixels or sums, even height but the last) to a spool.

    Summing sums (never rounded means) keeps every level an exact box mean of level 0.
    """
    rows = min(strip.shape[0] // 2, sums_out.height - sums_out.rows)
    if rows > 0:
        sums_out.append(_pool2(strip, rows, sums_out.width, sums_out.dtype))


def _reduced_tiles(
    sums: _Spool, level: int, tile: int, sums_out: _Spool | None
) -> Iterator[np.ndarray]:
    """Yield tiles of level `level` from its exact sums; feed the next level's sums."""
    n = 4**level
    for block in sums.strips(tile):
        strip = ((block.astype(np.uint32) + n // 2) // n).astype(np.uint8)
        if sums_out is not None:
            _accumulate(block, sums_out)
        yield from _tiles_of(strip, tile)


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    tile_source: TileSource,
    width: int,
    height: int,
    *,
    mpp: float,
    tile: int = 256,
    quality: int = 90,
    min_level_side: int = 1024,
    description: str = DEFAULT_DESCRIPTION,
    workers: int = 2,
) -> None:
    """Write a JPEG-tiled pyramidal TIFF from a level-0 `tile_source`, streamed and atomic.

    `tile_source` is called once per tile row with the full width; rows are rendered `workers`
    ahead in threads. The file appears under `path` only when complete (temporary name in the
    same folder, then rename). Levels are top-level pages with resolution in pixels per cm.
    """
    if tile % 16 or tile < 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not 0.0 < mpp < 1e4:
        raise ValueError(f"mpp must be positive, got {mpp}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = pyramid_dims(width, height, min_level_side)
    bigtiff = width * height * 3 * 4 // 3 > 2**31
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=path.parent) as scratch_dir:
            scratch = Path(scratch_dir)
            with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as writer:
                sums: _Spool | None = None
                for level, (w, h) in enumerate(dims):
                    nxt = (
                        _Spool(*dims[level + 1], level + 1, scratch)
                        if level + 1 < len(dims)
                        else None
                    )
                    if level == 0:
                        tiles = _level0_tiles(tile_source, w, h, tile, nxt, workers)
                    else:
                        assert sums is not None
                        tiles = _reduced_tiles(sums, level, tile, nxt)
                    px_per_cm = 1e4 / (mpp * 2**level)
                    writer.write(
                        data=tiles,
                        shape=(h, w, 3),
                        dtype=np.uint8,
                        tile=(tile, tile),
                        photometric="rgb",
                        compression="jpeg",
                        compressionargs={"level": int(quality)},
                        resolution=(px_per_cm, px_per_cm),
                        resolutionunit="CENTIMETER",
                        subfiletype=0 if level == 0 else 1,
                        description=description if level == 0 else None,
                        metadata=None,
                        maxworkers=max(1, workers),
                        buffersize=16 * 2**20,  # tiles queued for encoding: bounds memory
                    )
                    if sums is not None:
                        sums.close()
                    sums = nxt
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a slide is a shared, read-only input
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_pyramidal_tiff_from_array(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    mpp: float,
    tile: int = 256,
    quality: int = 90,
    min_level_side: int = 1024,
    description: str = DEFAULT_DESCRIPTION,
) -> None:
    """Write an in-memory (h, w, 3) uint8 image as a pyramidal TIFF (small images, tests)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (h, w, 3), got {image.dtype} {image.shape}")

    def source(x: int, y: int, w: int, h: int) -> np.ndarray:
        return image[y : y + h, x : x + w]

    write_pyramidal_tiff(
        path, source, image.shape[1], image.shape[0], mpp=mpp, tile=tile, quality=quality,
        min_level_side=min_level_side, description=description,
    )
