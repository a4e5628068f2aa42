"""Plan patches for a tiling mode (pure functions) and extract them from the WSI.

A patch is `patch_px` pixels at `target_mpp`, so its footprint on the slide is
`patch_px * target_mpp / mpp` level-0 px. Pixels come from the coarsest pyramid level that is
not coarser than the target and are resampled to the exact target (never snapped to 20x/40x).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from histmol.config import Resample

# Filter support radius in source pixels per unit of down-scaling, as Pillow defines them.
FILTER_SUPPORT = {"lanczos": 3.0, "bilinear": 1.0, "box": 0.5}
PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
READ_BAND_PX = 2048  # raster order within horizontal bands of this many level-0 px


@dataclass(frozen=True)
class PatchPlan:
    """Patches (top-left corners in level-0 px) and which patch holds each unit.

    `unit_pair[i]` is the pair index of unit i, or -1 when the unit is in no kept patch.
    Pairs are numbered in extraction (raster) order.
    """

    x0: np.ndarray
    y0: np.ndarray
    footprint: float
    unit_pair: np.ndarray

    @property
    def n_pairs(self) -> int:
        """Number of planned patches."""
        return len(self.x0)


def footprint_px(patch_px: int, target_mpp: float, mpp: float) -> float:
    """Side of a patch on the slide in level-0 px."""
    return patch_px * target_mpp / mpp


def plan_spot(x: np.ndarray, y: np.ndarray, footprint: float) -> PatchPlan:
    """One patch centred on each unit, numbered in raster order of the unit centres."""
    x0 = np.asarray(x, dtype=np.float64) - footprint / 2
    y0 = np.asarray(y, dtype=np.float64) - footprint / 2
    order = raster_order(x0, y0)
    unit_pair = np.empty(len(order), dtype=np.int64)
    unit_pair[order] = np.arange(len(order))
    return PatchPlan(x0[order], y0[order], footprint, unit_pair)


def plan_grid(x: np.ndarray, y: np.ndarray, footprint: float) -> PatchPlan:
    """A regular grid of patches anchored at (0, 0); each unit goes to the patch holding its centre.

    A unit on a shared border belongs to the patch on its right/bottom (half-open cells), so no
    unit is lost or counted twice. Only patches holding at least one unit are planned.
    """
    col = np.floor(np.asarray(x, dtype=np.float64) / footprint).astype(np.int64)
    row = np.floor(np.asarray(y, dtype=np.float64) / footprint).astype(np.int64)
    cells, unit_cell = np.unique(np.column_stack([row, col]), axis=0, return_inverse=True)
    # np.unique sorts rows lexicographically by (row, col): already raster order.
    x0 = cells[:, 1].astype(np.float64) * footprint
    y0 = cells[:, 0].astype(np.float64) * footprint
    return PatchPlan(x0, y0, footprint, unit_cell.ravel().astype(np.int64))


def raster_order(x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """Indices sorting boxes by band of rows, then by column: reads then follow the WSI tiles."""
    band = np.floor(np.asarray(y0) / READ_BAND_PX)
    return np.lexsort((np.asarray(y0), np.asarray(x0), band))


def keep_pairs(plan: PatchPlan, keep: np.ndarray) -> PatchPlan:
    """Drop the pairs where `keep` is False; their units become -1; pairs are renumbered."""
    keep = np.asarray(keep, dtype=bool)
    new_index = np.full(plan.n_pairs, -1, dtype=np.int64)
    new_index[keep] = np.arange(int(keep.sum()))
    unit_pair = np.where(plan.unit_pair >= 0, new_index[np.maximum(plan.unit_pair, 0)], -1)
    return PatchPlan(plan.x0[keep], plan.y0[keep], plan.footprint, unit_pair)


class RegionSource(Protocol):
    """What extraction needs of a slide (histmol.wsi.SlideReader satisfies it)."""

    level_downsamples: tuple[float, ...]

    def best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest level not coarser than `downsample`."""
        ...

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 pixels of a box in that level's frame, white outside the image."""
        ...


@dataclass
class ExtractionTimes:
    """Seconds spent per stage, summed over threads, and patches read per pyramid level."""

    read_s: float = 0.0
    resample_s: float = 0.0
    per_level: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, level: int, read_s: float, resample_s: float) -> None:
        """Account one patch (called from worker threads)."""
        with self._lock:
            self.read_s += read_s
            self.resample_s += resample_s
            self.per_level[level] = self.per_level.get(level, 0) + 1


def resample_box(
    region: np.ndarray, box: tuple[float, float, float, float], patch_px: int, resample: Resample
) -> np.ndarray:
    """Resample the float box (left, top, right, bottom, in `region` px) to patch_px square.

    Pillow's box resize is exact sub-pixel crop+resample with antialiasing; it uses pixels
    outside the box (inside the region) for filter support, so callers read a margin.
    """
    image = Image.fromarray(region)
    out = image.resize((patch_px, patch_px), PIL_FILTERS[resample], box=box)
    return np.asarray(out)


def read_margin(scale: float, resample: Resample) -> int:
    """Source pixels of margin that cover the filter support at a given down-scaling."""
    return int(math.ceil(FILTER_SUPPORT[resample] * max(scale, 1.0))) + 2


@dataclass(frozen=True)
class PatchWindow:
    """Where one patch's pixels come from: an integer window of a level, and a float box in it."""

    level: int
    x: int
    y: int
    width: int
    height: int
    box: tuple[float, float, float, float]


def patch_window(
    x0: float,
    y0: float,
    footprint: float,
    patch_px: int,
    resample: Resample,
    level: int,
    downsample: float,
) -> PatchWindow:
    """The level window (with a margin covering the filter support) and the box inside it."""
    bx0, by0, side = x0 / downsample, y0 / downsample, footprint / downsample
    margin = read_margin(side / patch_px, resample)
    rx0 = math.floor(bx0) - margin
    ry0 = math.floor(by0) - margin
    width = math.ceil(bx0 + side) + margin - rx0
    height = math.ceil(by0 + side) + margin - ry0
    box = (bx0 - rx0, by0 - ry0, bx0 - rx0 + side, by0 - ry0 + side)
    return PatchWindow(level, rx0, ry0, width, height, box)


def extract_patch(
    slide: RegionSource,
    x0: float,
    y0: float,
    footprint: float,
    patch_px: int,
    resample: Resample,
    times: ExtractionTimes | None = None,
) -> np.ndarray:
    """Pixels of one patch: read a window of the best level, then resample the box exactly."""
    level = slide.best_level_for_downsample(footprint / patch_px)
    window = patch_window(
        x0, y0, footprint, patch_px, resample, level, slide.level_downsamples[level]
    )
    start = time.perf_counter()
    region = slide.read_region(level, window.x, window.y, window.width, window.height)
    read_done = time.perf_counter()
    patch = resample_box(region, window.box, patch_px, resample)
    if times is not None:
        times.add(level, read_done - start, time.perf_counter() - read_done)
    return patch


def extract_patches(
    slide: RegionSource,
    plan: PatchPlan,
    patch_px: int,
    resample: Resample,
    *,
    threads: int = 2,
    times: ExtractionTimes | None = None,
) -> Iterator[np.ndarray]:
    """Yield the plan's patches in pair order, extracted by a thread pool.

    At most `4 * threads` patches are in flight so memory stays flat on huge sections.
    """
    if plan.n_pairs == 0:
        return
    window = max(4 * threads, 1)

    def one(index: int) -> np.ndarray:
        return extract_patch(
            slide,
            float(plan.x0[index]),
            float(plan.y0[index]),
            plan.footprint,
            patch_px,
            resample,
            times,
        )

    with ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="histmol-tile") as pool:
        pending = deque(pool.submit(one, i) for i in range(min(window, plan.n_pairs)))
        next_index = len(pending)
        while pending:
            patch = pending.popleft().result()
            if next_index < plan.n_pairs:
                pending.append(pool.submit(one, next_index))
                next_index += 1
            yield patch
