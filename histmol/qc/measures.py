"""Numbers and rasters the QC figures draw, kept free of matplotlib so they are testable alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from histmol.qc.section_data import StoredSection

MAX_PITCH_SAMPLE = 20_000
MAX_STENCIL_WORK = 20_000_000  # unit x stencil pixels painted per chunk
MPP_SOURCES = ("embedded", "scalefactors", "estimated_from_pitch")
# per-unit values -> the slide with them blended over it: figures.UnitLayer.over(values, norm,
# cmap, alpha, side, base=None)
Overlay = Callable[..., np.ndarray]


def paint_units(
    shape: tuple[int, int],
    downsample: tuple[float, float],
    x: np.ndarray,
    y: np.ndarray,
    size_px: float,
    unit_shape: str,
    values: np.ndarray,
) -> np.ndarray:
    """Raster (rows, cols) of `values` painted over each unit's true footprint; NaN elsewhere.

    `x`, `y` are unit centres and `size_px` the diameter (circle) or side (square), all in
    level-0 px; `downsample` is level-0 px per raster px (x, y). A unit smaller than a raster
    pixel still paints the pixel under its centre, so no unit vanishes from an overview. Where
    units overlap the later one wins.
    """
    rows, cols = shape
    out = np.full(shape, np.nan, dtype=np.float64)
    rx, ry = size_px / 2 / downsample[0], size_px / 2 / downsample[1]
    dy, dx = np.mgrid[
        -int(np.ceil(ry)) : int(np.ceil(ry)) + 1, -int(np.ceil(rx)) : int(np.ceil(rx)) + 1
    ]
    if unit_shape == "circle":
        inside = (dx / max(rx, 0.5)) ** 2 + (dy / max(ry, 0.5)) ** 2 <= 1.0
    else:
        inside = (np.abs(dx) <= max(rx, 0.5)) & (np.abs(dy) <= max(ry, 0.5))
    dy, dx = dy[inside], dx[inside]
    cx = np.floor(np.asarray(x, np.float64) / downsample[0]).astype(np.int64)
    cy = np.floor(np.asarray(y, np.float64) / downsample[1]).astype(np.int64)
    values = np.asarray(values, dtype=np.float64)
    step = max(1, MAX_STENCIL_WORK // max(len(dx), 1))
    for start in range(0, len(cx), step):
        r = (cy[start : start + step, None] + dy[None, :]).ravel()
        c = (cx[start : start + step, None] + dx[None, :]).ravel()
        v = np.repeat(values[start : start + step], len(dx))
        ok = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        out[r[ok], c[ok]] = v[ok]
    return out


@dataclass(frozen=True)
class UnitPixels:
    """The pixels of a raster that units cover (flat indices) and the unit number on each."""

    shape: tuple[int, int]
    index: np.ndarray
    unit: np.ndarray

    @classmethod
    def of(cls, units: np.ndarray) -> UnitPixels:
        """From a raster of unit numbers (`paint_units` of 0..n-1: NaN off the units)."""
        index = np.flatnonzero(~np.isnan(units))
        return cls((units.shape[0], units.shape[1]), index, units.ravel()[index].astype(np.intp))


def blend_units(
    image: np.ndarray, pixels: UnitPixels, colours: np.ndarray, alpha: float, side: int
) -> np.ndarray:
    """`image` (RGB uint8) with each unit's colour blended over its footprint, at most `side` px.

    `pixels` are the units' pixels on `image`'s grid and `colours` the n RGB(A) colours in 0..1.
    Painting at the background's resolution and then box-averaging to about the size drawn
    keeps round units round, and hands matplotlib one small opaque image instead of a large
    background and a large float overlay to colour and resample.
    """
    out = image.copy()
    flat = out.reshape(-1, 3)
    if len(pixels.index):
        tint = np.asarray(colours, np.float32)[:, :3] * np.float32(255.0 * alpha)
        under = flat[pixels.index].astype(np.float32) * np.float32(1.0 - alpha)
        flat[pixels.index] = np.rint(under + tint[pixels.unit]).astype(np.uint8)
    height, width = out.shape[:2]
    scale = side / max(height, width)
    if scale >= 1.0:
        return out
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(out).resize(size, Image.Resampling.BOX))


def nominal_pitch_um(section: StoredSection) -> float | None:
    """Centre-to-centre unit distance the section's adapter stated (sections.parquet pitch_um).

    None where the adapter knew no pitch (e.g. legacy ST 2k arrays, randomly packed beads).
    """
    pitch = section.row.get("pitch_um")
    if pitch is None or not np.isfinite(pitch):
        return None
    return float(pitch)


def neighbour_distances_um(section: StoredSection) -> np.ndarray:
    """Distances (um, at the resolved mpp) from units to their lattice neighbours.

    Neighbours are those within 1.3x the median nearest-neighbour distance (the 4 of a square
    grid, the 6 of a hexagonal one), the same rule registration uses to estimate the pitch; a
    sample of at most MAX_PITCH_SAMPLE units is queried.
    """
    points = section.units[["x_um", "y_um"]].to_numpy(np.float64)
    if len(points) < 2:
        return np.empty(0)
    query = points
    if len(points) > MAX_PITCH_SAMPLE:
        query = points[
            np.random.default_rng(0).choice(len(points), MAX_PITCH_SAMPLE, replace=False)
        ]
    distances, _ = cKDTree(points).query(query, k=min(7, len(points)))
    neighbours = distances[:, 1:]
    positive = neighbours[neighbours > 0]
    if not len(positive):
        return np.empty(0)
    nearest = float(np.median(neighbours[:, 0][neighbours[:, 0] > 0]))
    return neighbours[(neighbours > 0) & (neighbours < 1.3 * nearest)]


@dataclass(frozen=True)
class MppCheck:
    """The pixel-size candidates the build saw, the one it used, and the tolerance."""

    candidates: dict[str, float]
    resolved: float
    source: str
    tolerance: float

    def disagreement(self, source: str) -> float | None:
        """Relative difference of a candidate from the pitch estimate (None without both)."""
        pitch = self.candidates.get("estimated_from_pitch")
        value = self.candidates.get(source)
        if pitch is None or value is None or source == "estimated_from_pitch":
            return None
        return value / pitch - 1.0


def mpp_check(section: StoredSection) -> MppCheck:
    """Read the mpp candidates (``qc_mpp_<source>``) recorded in the section's row."""
    candidates = {}
    for source in MPP_SOURCES:
        value = section.row.get(f"qc_mpp_{source}")
        if value is not None and np.isfinite(value):
            candidates[source] = float(value)
    tolerance = float(section.options.get("mpp_tolerance", 0.05))
    return MppCheck(candidates, section.mpp, str(section.row["mpp_source"]), tolerance)


def zoom_pair(section: StoredSection) -> int:
    """Pick the pair to show at full resolution: its centre is nearest the units' median.

    The median sits inside the tissue for any sensible section, and the choice is deterministic.
    """
    pairs = section.pairs()
    half = section.footprint_px / 2
    cx, cy = pairs["x0"].to_numpy() + half, pairs["y0"].to_numpy() + half
    mx, my = np.median(section.units["x_wsi_px"]), np.median(section.units["y_wsi_px"])
    return int(pairs["pair"].to_numpy()[np.argmin((cx - mx) ** 2 + (cy - my) ** 2)])
