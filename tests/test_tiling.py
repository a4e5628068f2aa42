"""Tiling plans (pure) and patch extraction equal to a direct crop + resample of the slide."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histmol.tiling import (
    ExtractionTimes,
    extract_patch,
    extract_patches,
    footprint_px,
    keep_pairs,
    patch_window,
    plan_grid,
    plan_spot,
)
from histmol.tissue import tissue_mask


def test_footprint() -> None:
    assert footprint_px(224, 0.5, 0.25) == 448.0
    assert footprint_px(224, 0.5, 0.5) == 224.0


def test_spot_plan_centres_patches_and_orders_them_in_raster_bands() -> None:
    x = np.array([5000.0, 10.0, 20.0, 9000.0])
    y = np.array([100.0, 3000.0, 120.0, 2100.0])
    plan = plan_spot(x, y, 100.0)
    # bands of 2048 px: units 0, 2 in band 0 (sorted by x: 2 then 0), units 1 then 3 in band 1.
    np.testing.assert_array_equal(plan.unit_pair, [1, 2, 0, 3])
    np.testing.assert_array_equal(plan.x0, [-30.0, 4950.0, -40.0, 8950.0])
    np.testing.assert_array_equal(plan.y0, [70.0, 50.0, 2950.0, 2050.0])


def test_grid_plan_assigns_every_unit_exactly_once_including_borders() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1000, 5000)
    y = rng.uniform(0, 700, 5000)
    x[:4] = [0.0, 100.0, 99.999, 200.0]  # exactly on cell borders
    y[:4] = [0.0, 100.0, 50.0, 0.0]
    plan = plan_grid(x, y, 100.0)
    assert (plan.unit_pair >= 0).all()
    x0 = plan.x0[plan.unit_pair]
    y0 = plan.y0[plan.unit_pair]
    assert ((x >= x0) & (x < x0 + 100) & (y >= y0) & (y < y0 + 100)).all()
    assert plan.unit_pair[1] != plan.unit_pair[2]  # 100.0 goes right, 99.999 stays left
    assert plan.n_pairs == 70  # 10 x 7 cells, all hit by 5000 uniform points
    assert np.bincount(plan.unit_pair).sum() == 5000
    # raster order: rows first, then columns
    order = np.lexsort((plan.x0, plan.y0))
    np.testing.assert_array_equal(order, np.arange(plan.n_pairs))


def test_keep_pairs_renumbers_and_drops_units() -> None:
    plan = plan_grid(np.array([5.0, 150.0, 160.0, 250.0]), np.zeros(4), 100.0)
    kept = keep_pairs(plan, np.array([True, False, True]))
    np.testing.assert_array_equal(kept.unit_pair, [0, -1, -1, 1])
    np.testing.assert_array_equal(kept.x0, [0.0, 200.0])


class ArraySlide:
    """A two-level in-memory pyramid standing in for a WSI (white outside)."""

    def __init__(self, level0: np.ndarray) -> None:
        level1 = np.asarray(Image.fromarray(level0).reduce(2))
        self.levels = [level0, level1]
        self.level_downsamples = (1.0, level0.shape[1] / level1.shape[1])

    def best_level_for_downsample(self, downsample: float) -> int:
        return 1 if downsample >= self.level_downsamples[1] else 0

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        image = self.levels[level]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        ys, xs = max(y, 0), max(x, 0)
        ye, xe = min(y + height, image.shape[0]), min(x + width, image.shape[1])
        if ye > ys and xe > xs:
            out[ys - y:ye - y, xs - x:xe - x] = image[ys:ye, xs:xe]
        return out


@pytest.fixture(scope="module")
def slide() -> ArraySlide:
    rng = np.random.default_rng(1)
    return ArraySlide(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))


FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
           "box": Image.Resampling.BOX}


@pytest.mark.parametrize("resample", ["lanczos", "bilinear", "box"])
@pytest.mark.parametrize("footprint", [64.0, 100.3, 313.7])
def test_patch_equals_direct_crop_and_resample_of_the_level(
    slide: ArraySlide, footprint: float, resample: str
) -> None:
    x0, y0, patch_px = 401.37, 299.81, 64
    patch = extract_patch(slide, x0, y0, footprint, patch_px, resample)  # type: ignore[arg-type]
    level = slide.best_level_for_downsample(footprint / patch_px)
    assert level == (1 if footprint / patch_px >= 2 else 0)
    ds = slide.level_downsamples[level]
    # Direct: slice the level array itself at the window, resample the box with Pillow.
    window = patch_window(x0, y0, footprint, patch_px, resample, level, ds)  # type: ignore[arg-type]
    crop = slide.levels[level][window.y:window.y + window.height, window.x:window.x + window.width]
    expected = np.asarray(
        Image.fromarray(crop).resize((patch_px, patch_px), FILTERS[resample], box=window.box)
    )
    np.testing.assert_array_equal(patch, expected)
    # The margin covers the filter support: resampling the whole level agrees up to Pillow's
    # 8-bit fixed-point rounding of coefficients (at most 1 grey level on a few pixels).
    whole_box = (x0 / ds, y0 / ds, (x0 + footprint) / ds, (y0 + footprint) / ds)
    whole = np.asarray(
        Image.fromarray(slide.levels[level]).resize(
            (patch_px, patch_px), FILTERS[resample], box=whole_box
        )
    )
    difference = np.abs(whole.astype(int) - patch.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.005


def test_patch_over_the_edge_is_white_outside(slide: ArraySlide) -> None:
    patch = extract_patch(slide, -200.0, -200.0, 128.0, 64, "box")
    assert (patch == 255).all()


def test_threaded_extraction_preserves_order_and_counts_levels(slide: ArraySlide) -> None:
    rng = np.random.default_rng(2)
    plan = plan_spot(rng.uniform(100, 1500, 37), rng.uniform(100, 1100, 37), 140.0)
    times = ExtractionTimes()
    threaded = list(extract_patches(slide, plan, 32, "lanczos", threads=3, times=times))
    serial = [extract_patch(slide, plan.x0[i], plan.y0[i], 140.0, 32, "lanczos") for i in range(37)]
    assert len(threaded) == 37
    for a, b in zip(threaded, serial, strict=True):
        np.testing.assert_array_equal(a, b)
    assert times.per_level == {1: 37}


def test_tissue_mask_and_box_fractions() -> None:
    thumb = np.full((100, 200, 3), 245, dtype=np.uint8)
    thumb[20:60, 40:120] = (190, 90, 170)  # stained tissue, 40 x 80 px
    mask = tissue_mask(thumb, downsample_x=10.0, downsample_y=10.0)
    # the rectangle, minus corners rounded off by the opening with a radius-2 disk
    assert 40 * 80 - 16 <= mask.mask.sum() <= 40 * 80
    assert not mask.mask[:20].any() and not mask.mask[:, :40].any()
    fractions = mask.box_fractions(
        np.array([600.0, 0.0, 1100.0]), np.array([300.0, 0.0, 400.0]), 200.0
    )
    np.testing.assert_allclose(fractions, [1.0, 0.0, 0.5], atol=0.01)  # one rounded corner
