"""Tissue mask at low resolution, and the tissue fraction of patch footprints.

A classical mask is enough to drop glass and debris patches: stained tissue is saturated,
glass is bright and grey. Otsu on HSV saturation, clipped to a sane range so that an image that
is all tissue (or all glass) does not split on noise, then morphological clean-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TissueMask:
    """Boolean mask and how many level-0 px one mask px spans (per axis)."""

    mask: np.ndarray
    downsample_x: float
    downsample_y: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def box_fractions(self, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
        """Tissue fraction of square level-0 boxes (x0, y0, size), by mask-pixel centres.

        Uses a summed-area table so a million boxes cost a few vectorised lookups.
        """
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        table[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        height, width = self.mask.shape
        c0 = np.clip(np.ceil(np.asarray(x0) / self.downsample_x - 0.5), 0, width).astype(np.int64)
        c1 = np.clip(np.ceil((np.asarray(x0) + size) / self.downsample_x - 0.5), 0, width).astype(
            np.int64
        )
        r0 = np.clip(np.ceil(np.asarray(y0) / self.downsample_y - 0.5), 0, height).astype(np.int64)
        r1 = np.clip(np.ceil((np.asarray(y0) + size) / self.downsample_y - 0.5), 0, height).astype(
            np.int64
        )
        inside = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
        area = np.maximum((r1 - r0) * (c1 - c0), 0)
        # A box smaller than a mask pixel: take the pixel under its centre.
        tiny = area == 0
        fractions = np.divide(inside, area, out=np.zeros(len(area), dtype=np.float64), where=~tiny)
        if tiny.any():
            cx = np.clip(
                ((np.asarray(x0)[tiny] + size / 2) / self.downsample_x).astype(int), 0, width - 1
            )
            cy = np.clip(
                ((np.asarray(y0)[tiny] + size / 2) / self.downsample_y).astype(int), 0, height - 1
            )
            fractions[tiny] = self.mask[cy, cx]
        return fractions


def mask_at(mask: TissueMask, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask value under level-0 points (False outside the slide)."""
    height, width = mask.mask.shape
    col = np.floor(np.asarray(x) / mask.downsample_x).astype(np.int64)
    row = np.floor(np.asarray(y) / mask.downsample_y).astype(np.int64)
    inside = (col >= 0) & (row >= 0) & (col < width) & (row < height)
    values = np.zeros(len(col), dtype=bool)
    values[inside] = mask.mask[row[inside], col[inside]]
    return values


def tissue_mask(thumbnail: np.ndarray, *, downsample_x: float, downsample_y: float) -> TissueMask:
    """Segment tissue in an RGB uint8 thumbnail taken at `downsample` level-0 px per pixel."""
    from skimage import color, filters, morphology  # ~0.1 s to import: only when segmenting

    rgb = thumbnail[..., :3].astype(np.float32) / 255.0
    hsv = color.rgb2hsv(rgb)
    saturation, value = hsv[..., 1], hsv[..., 2]
    try:
        threshold = float(filters.threshold_otsu(saturation))
    except ValueError:  # a constant image
        threshold = 0.08
    threshold = float(np.clip(threshold, 0.05, 0.25))
    mask = (saturation > threshold) & (value > 0.1)
    radius = 2 if min(mask.shape) >= 64 else 1
    mask = morphology.closing(mask, morphology.disk(radius))
    mask = morphology.opening(mask, morphology.disk(radius))
    min_size = max(int(mask.size * 1e-4), 4)
    mask = morphology.remove_small_objects(mask, max_size=min_size)
    mask = morphology.remove_small_holes(mask, max_size=min_size * 4)
    return TissueMask(mask.astype(bool), float(downsample_x), float(downsample_y), threshold)


def slide_tissue_mask(slide: Any, mpp: float, tissue_mpp: float) -> TissueMask:
    """Tissue mask of a slide from a thumbnail at about `tissue_mpp` um/px.

    `slide` is an open `histmol.wsi.SlideReader` (its `dimensions` and `thumbnail`). One
    definition shared by the build's tissue stage and the QC figures that redraw its mask.
    """
    width, height = slide.dimensions
    max_side = int(np.clip(max(width, height) * mpp / tissue_mpp, 64, 4096))
    thumbnail, _ = slide.thumbnail(max_side)
    return tissue_mask(
        thumbnail,
        downsample_x=width / thumbnail.shape[1],
        downsample_y=height / thumbnail.shape[0],
    )
DEFAULT_MIN_TISSUE_FRACTION = 0.1


def pair_assay_flags(in_tissue: np.ndarray, unit_pair: np.ndarray, n_pairs: int) -> np.ndarray:
    """Per pair: whether the assay marks one of its units as under tissue (in_tissue == 1)."""
    flags = np.zeros(n_pairs, dtype=bool)
    placed = unit_pair >= 0
    np.logical_or.at(flags, unit_pair[placed], np.asarray(in_tissue)[placed] == 1)
    return flags


def tissue_keep(
    fractions: np.ndarray, assay: np.ndarray | None, min_fraction: float | None
) -> tuple[np.ndarray, dict[str, float | int | str]]:
    """Which pairs to keep, and QC counts saying what was kept or dropped and why.

    The assay knows better than a saturation threshold (pale fat and loose stroma are tissue):
    pairs it marks under tissue (`assay`, None when the bundle marks nothing) are kept and only
    flagged when the image mask disagrees; other pairs go by the image. A threshold the user
    gives (`min_fraction`) applies to every pair, as without assay marks.
    """
    threshold = DEFAULT_MIN_TISSUE_FRACTION if min_fraction is None else min_fraction
    image_ok = np.asarray(fractions) >= threshold
    trust = assay is not None and min_fraction is None
    keep = image_ok | assay if trust else image_ok
    below = ~image_ok
    qc: dict[str, float | int | str] = {
        "tissue_filter": "assay" if trust else ("image (given)" if min_fraction is not None
                                                else "image"),
        "tissue_min_fraction": threshold,
        "n_pairs_below_tissue_fraction": int(below.sum()),
        "n_pairs_kept_by_assay": int((below & keep).sum()),
        "n_pairs_dropped_tissue": int((~keep).sum()),
    }
    if assay is not None:
        qc["n_pairs_assay_in_tissue"] = int(np.asarray(assay).sum())
    return keep, qc
