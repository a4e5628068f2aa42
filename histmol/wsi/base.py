"""The reader interface every WSI backend implements, with the shared band-wise thumbnail."""

from __future__ import annotations

import abc
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from histmol.errors import WSIError
from histmol.wsi.mpp import (
    MppResult,
)

THUMBNAIL_BAND_PX = 8_000_000  # level pixels read per band while building a thumbnail
WHITE = 255


class SlideReader(abc.ABC):
    """A read-only view of one slide's pyramid; a context manager (close releases handles).

    `level_dimensions` are (width, height) per level, level 0 first; `level_downsamples` are
    level-0 px per level px (mean of x and y, as OpenSlide reports). `embedded_mpp` is the
    level-0 um/px the file states, None when absent or a placeholder; `mpp_discard_reason` says
    why a stated value was rejected (None when accepted or when the file states nothing).
    """

    backend: ClassVar[str]

    def __init__(
        self,
        path: Path,
        level_dimensions: Sequence[tuple[int, int]],
        level_downsamples: Sequence[float],
        mpp: MppResult,
    ) -> None:
        self.path = Path(path)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.embedded_mpp: float | None = mpp.mpp
        self.mpp_discard_reason: str | None = mpp.reason
        self.mpp_source: str | None = mpp.source
        self._closed = False

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) RGB uint8 of the box at (x, y) in `level`'s own pixel frame.

        Parts outside the image are white. Safe to call concurrently from several threads.
        """
        level, x, y = operator.index(level), operator.index(x), operator.index(y)
        width, height = operator.index(width), operator.index(height)
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} not in 0..{self.level_count - 1}")
        if width < 1 or height < 1:
            raise ValueError(f"{self.path}: region size {width} x {height} must be positive")
        if self._closed:
            raise WSIError(self.path, "the slide reader is closed")
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if x0 == x and y0 == y and x1 == x + width and y1 == y + height:
            return self._read_inside(level, x, y, width, height)
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            inside = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = inside
        return out

    @abc.abstractmethod
    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) RGB uint8 of a box lying wholly inside `level`."""

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= `downsample`; level 0 if none is."""
        limit = float(downsample) * (1 + 1e-6)
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= limit and level_downsample > self.level_downsamples[best]:
                best = level
        return best

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """RGB uint8 image with longer side <= `max_side`, and level-0 px per thumbnail px.

        The longer side is exactly `max_side` unless the slide is smaller (then it is level 0,
        scale 1.0); the returned scale is exact for the longer side, the shorter side's differs
        by its rounding (under half a thumbnail pixel). Each thumbnail pixel is the exact area
        average of its footprint on the best level, read in bands so memory stays bounded even
        for a single-level giant TIFF.
        """
        max_side = operator.index(max_side)
        if max_side < 1:
            raise ValueError(f"{self.path}: thumbnail max_side {max_side} must be positive")
        width, height = self.dimensions
        longest = max(width, height)
        scale = max(1.0, longest / max_side)
        out_w = max(1, min(max_side, round(width / scale)))
        out_h = max(1, min(max_side, round(height / scale)))
        level = self.best_level_for_downsample(scale)
        level_w, level_h = self.level_dimensions[level]
        if (level_w, level_h) == (out_w, out_h):
            image = self.read_region(level, 0, 0, level_w, level_h)
        else:
            image = self._area_average(level, out_w, out_h)
        return image, longest / max(out_w, out_h)

    def _area_average(self, level: int, out_w: int, out_h: int) -> np.ndarray:
        """The whole level resampled to (out_w, out_h) by exact area averaging, band by band."""
        level_w, level_h = self.level_dimensions[level]
        weights_x = _area_weights(level_w, out_w)
        weights_y = _area_weights(level_h, out_h)
        scale_y = level_h / out_h
        band = max(1, THUMBNAIL_BAND_PX // level_w)
        total = np.zeros((out_h, out_w * 3), dtype=np.float64)
        for y0 in range(0, level_h, band):
            y1 = min(y0 + band, level_h)
            pixels = self.read_region(level, 0, y0, level_w, y1 - y0).astype(np.float32)
            columns = weights_x @ pixels.transpose(1, 0, 2).reshape(level_w, -1)
            columns = columns.reshape(out_w, y1 - y0, 3).transpose(1, 0, 2).reshape(y1 - y0, -1)
            r0, r1 = int(y0 / scale_y), min(out_h, int(np.ceil(y1 / scale_y)) + 1)
            total[r0:r1] += weights_y[r0:r1, y0:y1] @ columns
        return np.rint(total).clip(0, 255).astype(np.uint8).reshape(out_h, out_w, 3)

    def close(self) -> None:
        """Release file handles; further reads raise WSIError. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close()

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the backend's handles."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, levels={self.level_dimensions}, "
            f"mpp={self.embedded_mpp})"
        )


def _area_weights(n_in: int, n_out: int) -> Any:
    """Sparse (n_out, n_in) area-averaging weights for a 1-D downsample.

    Output pixel j averages input [j*s, (j+1)*s), s = n_in/n_out, counting the fraction of each
    input pixel that falls inside.
    """
    import scipy.sparse as sp  # imported here: only thumbnails need it

    scale = n_in / n_out
    edges = np.arange(n_out + 1, dtype=np.float64) * scale
    edges[-1] = n_in
    starts = np.floor(edges[:-1]).astype(np.int64)
    stops = np.minimum(np.ceil(edges[1:]).astype(np.int64), n_in)
    counts = stops - starts
    rows = np.repeat(np.arange(n_out), counts)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    cols = starts[rows] + np.arange(len(rows)) - offsets
    overlap = np.minimum(cols + 1, edges[rows + 1]) - np.maximum(cols, edges[rows])
    matrix = sp.csr_matrix((overlap / scale, (rows, cols)), shape=(n_out, n_in))
    return matrix.astype(np.float32)


def _mean_downsamples(dimensions: Sequence[tuple[int, int]]) -> tuple[float, ...]:
    """Level-0 px per level px, the mean of the x and y ratios (OpenSlide's convention)."""
    width0, height0 = dimensions[0]
    return tuple((width0 / w + height0 / h) / 2.0 for w, h in dimensions)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of non-premultiplied RGBA composited onto white (transparent means no tissue)."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * a + WHITE * (255 - a) + 127) // 255).astype(np.uint8)
