"""Automatic registration of a platform's own image to the H&E: images in, affine and score out.

Why: most public sections ship no transform to their H&E. Their bundle does hold an image in its
own frame (Visium's hires/lowres PNG, the DAPI / morphology image of Xenium, CosMx, MERSCOPE),
so the affine can be found by aligning that image to a downsampled level of the WSI.

Pure: no file is read or written. Coarse to fine, similarity model (rotation, flip, uniform
scale, translation; a rescanned or recropped slide differs by nothing else):

1. Both images become one "signal" where tissue is bright and glass is 0: optical density for
   H&E, the hematoxylin channel (`skimage.color.rgb2hed`) when the moving image is a nuclear
   stain (DAPI), whose intensity is normalised to its own percentiles.
2. Coarse (~200 px): the scale is the square root of the tissue-mask area ratio unless given;
   for both handednesses and rotations in 4 degree steps the moving signal is warped and the
   translation found by cross-correlation (`skimage.registration.phase_cross_correlation`,
   plain correlation); the best normalised cross-correlation wins. This covers 90-degree steps,
   arbitrary angles, flips and crops.
3. Fine: at successively finer levels (up to `fine_side` px) rotation, scale and translation
   are refined by maximising the correlation (Powell, bilinear warps) with sub-pixel accuracy.

Confidence is the correlation of the band-passed signals (detail: a difference of gaussians, so
a tissue outline alone scores low) over the overlap at the finest level; `mask_dice` (tissue
masks) and the plain correlation are reported beside it. The caller refuses below a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage, optimize

Modality = Literal["he", "nuclei"]

COARSE_SIDE = 128
ANGLE_STEP_DEG = 5.0
MAX_SAMPLES = 12_000
FINAL_SAMPLES = 40_000
DEFAULT_FINE_SIDE = 1024
DEFAULT_MIN_CONFIDENCE = 0.3
GLASS_PERCENTILE = 1.0


@dataclass(frozen=True)
class AutoRegistration:
    """The found affine and how well the images agree under it.

    `native_to_wsi` maps the platform's native frame to WSI level-0 pixels; `moving_to_fixed`
    maps the moving image's pixels to the fixed image's (continuous coordinates, pixel edges at
    integers). `confidence` is `metrics["detail_ncc"]`.
    """

    native_to_wsi: np.ndarray
    moving_to_fixed: np.ndarray
    confidence: float
    metrics: dict[str, float | bool] = field(default_factory=dict)


def he_signal(rgb: np.ndarray) -> np.ndarray:
    """Tissue-ness of an RGB H&E image: summed optical density above the glass's, float32.

    The glass is the image's lightest percent (`GLASS_PERCENTILE`): a tinted or dim scan (some
    Space Ranger PNGs) then reads ~0 off tissue, like the white glass of a WSI, and a crop that
    is all tissue loses only its lightest shade.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        density = 1.0 - _unit(rgb)
    else:
        density = -np.log10(np.clip(_unit(rgb[..., :3]), 1 / 255.0, 1.0)).sum(axis=-1)
    glass = float(np.percentile(density[:: max(1, density.shape[0] // 256)], GLASS_PERCENTILE))
    return np.clip(density - glass, 0.0, None).astype(np.float32)


def hematoxylin_signal(rgb: np.ndarray) -> np.ndarray:
    """The hematoxylin (nuclear) channel of an H&E image by colour deconvolution, float32 >= 0."""
    from skimage.color import rgb2hed

    hed = rgb2hed(np.asarray(rgb)[..., :3])
    return np.clip(hed[..., 0], 0.0, None).astype(np.float32)


def nuclear_stain_signal(image: np.ndarray) -> np.ndarray:
    """A DAPI / morphology image scaled to its 1st..99.5th percentiles, float32 in 0..1."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image.mean(axis=-1)
    lo, hi = np.percentile(image, [1.0, 99.5])
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def autoregister(
    moving: np.ndarray,
    moving_to_native: np.ndarray,
    fixed: np.ndarray,
    fixed_to_wsi: np.ndarray,
    *,
    modality: Modality = "he",
    scale: float | None = None,
    fine_side: int = DEFAULT_FINE_SIDE,
    initial: np.ndarray | None = None,
) -> AutoRegistration:
    """Align the platform's image (`moving`) to an H&E thumbnail (`fixed`).

    Args:
        moving: the platform's image: RGB H&E (modality "he") or a nuclear stain (2-D).
        moving_to_native: 3x3 affine from `moving`'s pixels to the platform's native frame
            (Visium lowres: diag(1/scalef, 1/scalef, 1)).
        fixed: the H&E (RGB), a downsampled level or thumbnail of the WSI.
        fixed_to_wsi: 3x3 affine from `fixed`'s pixels to WSI level-0 pixels.
        modality: "he" (H&E against H&E) or "nuclei" (a nuclear stain against hematoxylin).
        scale: fixed pixels per moving pixel when known (both pixel sizes known); else estimated
            from the tissue areas and refined.
        fine_side: longest side of the finest level worked on (both images are downsampled to it).
        initial: a moving->fixed estimate (a coarser pass); skips the coarse search.

    Returns:
        The affine, the confidence and the metrics (no threshold is applied here).
    """
    moving_to_native = np.asarray(moving_to_native, np.float64)
    fixed_to_wsi = np.asarray(fixed_to_wsi, np.float64)
    fixed_signal = he_signal(fixed) if modality == "he" else hematoxylin_signal(fixed)
    moving_signal = he_signal(moving) if modality == "he" else nuclear_stain_signal(moving)
    pyramid = _Pyramid(moving_signal, fixed_signal)
    side = max(fixed_signal.shape)
    if initial is None:
        transform, coarse_ncc, flipped = _coarse(pyramid, scale)
        transform = _refine(
            pyramid, transform, COARSE_SIDE, fixed_scale=scale is not None,
            reach=COARSE_SIDE * np.radians(ANGLE_STEP_DEG),
        )
    else:
        transform = np.asarray(initial, np.float64)
        coarse_ncc, flipped = float("nan"), bool(np.linalg.det(transform[:2, :2]) < 0)
    levels = [s for s in (400,) if s < min(side, fine_side)] + [min(side, fine_side)]
    for level_side in levels:
        final = level_side == levels[-1]
        transform = _refine(
            pyramid, transform, level_side, fixed_scale=scale is not None,
            samples=FINAL_SAMPLES if final else MAX_SAMPLES, xtol=0.01 if final else 0.05,
        )
    metrics = _scores(pyramid, transform, min(side, fine_side))
    linear = transform[:2, :2]
    metrics.update(
        coarse_ncc=coarse_ncc,
        flipped=flipped,
        rotation_deg=float(np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))),
        scale=float(np.sqrt(abs(np.linalg.det(linear)))),
    )
    native_to_wsi = fixed_to_wsi @ transform @ np.linalg.inv(moving_to_native)
    native_to_wsi[2] = (0.0, 0.0, 1.0)
    return AutoRegistration(native_to_wsi, transform, float(metrics["detail_ncc"]), metrics)


def _unit(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    return image.astype(np.float32)


class _Pyramid:
    """Both signals at any requested size, cached; sizes keep pixel edges on pixel edges."""

    def __init__(self, moving: np.ndarray, fixed: np.ndarray) -> None:
        self.moving, self.fixed = moving, fixed
        self._cache: dict[tuple[str, int], tuple[np.ndarray, float]] = {}

    def level(self, which: str, side: int) -> tuple[np.ndarray, float]:
        """(image, factor): the signal shrunk so its longest side is about `side` px.

        `factor` is original pixels per level pixel (an integer block size: exact geometry).
        """
        key = (which, side)
        if key not in self._cache:
            image = self.moving if which == "moving" else self.fixed
            factor = max(1, int(np.ceil(max(image.shape) / side)))
            if factor > 1:
                h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
                blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor)
                image = blocks.mean(axis=(1, 3), dtype=np.float32)
            self._cache[key] = (image, float(factor))
        return self._cache[key]


def _similarity(angle: float, scale: float, flip: bool) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    linear = np.array([[c, -s], [s, c]]) @ np.diag([-1.0 if flip else 1.0, 1.0])
    out = np.eye(3)
    out[:2, :2] = linear
    return out


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _at_level(transform: np.ndarray, moving_factor: float, fixed_factor: float) -> np.ndarray:
    """A moving->fixed transform in original pixels, expressed between two levels' pixels."""
    return np.diag([1 / fixed_factor, 1 / fixed_factor, 1.0]) @ transform @ np.diag(
        [moving_factor, moving_factor, 1.0]
    )


def resample(moving: np.ndarray, transform: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D `moving` resampled onto a grid of `shape` through moving->grid `transform` (bilinear).

    Continuous coordinates (pixel edges at integers); NaN where the grid falls outside `moving`.
    """
    return _warp(np.asarray(moving, np.float32), np.asarray(transform, np.float64), shape)


def _warp(moving: np.ndarray, transform: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`moving` resampled onto a grid of `shape` through moving->grid `transform`; NaN outside."""
    inverse = np.linalg.inv(transform)
    # index (r, c) -> continuous (c + .5, r + .5) -> inverse -> moving index (y - .5, x - .5)
    to_coords = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    to_index = np.array([[0.0, 1.0, -0.5], [1.0, 0.0, -0.5], [0.0, 0.0, 1.0]])
    index = to_index @ inverse @ to_coords
    return ndimage.affine_transform(
        moving, index[:2, :2], offset=index[:2, 2], output_shape=shape, order=1,
        mode="constant", cval=np.nan, prefilter=False,
    )


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    valid = np.isfinite(a) & np.isfinite(b)
    if valid.sum() < 16:
        return -1.0
    x, y = a[valid] - a[valid].mean(), b[valid] - b[valid].mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else -1.0


def _mask(signal: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(signal, 2.0)
    return smooth > threshold_otsu(smooth)


def _coarse(pyramid: _Pyramid, scale: float | None) -> tuple[np.ndarray, float, bool]:
    """Best similarity over flips, a rotation scan and (scale unknown) a scale scan."""
    every = np.radians(np.arange(0.0, 360.0, ANGLE_STEP_DEG))
    if scale is not None:
        return _scan(pyramid, [scale], every, (False, True))
    fixed, f_factor = pyramid.level("fixed", COARSE_SIDE)
    moving, m_factor = pyramid.level("moving", COARSE_SIDE)
    area_ratio = _mask(fixed).sum() * f_factor**2 / max(_mask(moving).sum() * m_factor**2, 1.0)
    guess = float(np.sqrt(area_ratio))  # a crop or a threshold inside tissue makes it rough
    wide = [guess * 2.0 ** (k / 3.0) for k in range(-3, 4)]
    transform, _, flip = _scan(pyramid, wide, every[::2], (False, True))
    linear = transform[:2, :2] @ np.diag([-1.0 if flip else 1.0, 1.0])
    found, angle = np.sqrt(abs(np.linalg.det(linear))), np.arctan2(linear[1, 0], linear[0, 0])
    near = [found * 2.0 ** (k / 12.0) for k in range(-2, 3)]
    angles = angle + np.radians(np.arange(-7.5, 7.6, 2.5))
    return _scan(pyramid, near, angles, (flip,))


def _scan(
    pyramid: _Pyramid, scales: list[float], angles: np.ndarray, flips: tuple[bool, ...]
) -> tuple[np.ndarray, float, bool]:
    """Try every (scale, angle, flip) at the coarse level, translation by cross-correlation."""
    from skimage.registration import phase_cross_correlation

    fixed, f_factor = pyramid.level("fixed", COARSE_SIDE)
    fixed = ndimage.gaussian_filter(fixed, 1.0)
    fixed_zero = fixed - fixed.mean()
    centre_f = np.array([fixed.shape[1], fixed.shape[0]]) * f_factor / 2.0
    best: tuple[float, np.ndarray, bool] = (-np.inf, np.eye(3), False)
    for scale in scales:
        moving, m_factor = pyramid.level("moving", _moving_side(pyramid, scale, f_factor))
        moving = ndimage.gaussian_filter(moving, 1.0)
        centre_m = np.array([moving.shape[1], moving.shape[0]]) * m_factor / 2.0
        for flip in flips:
            for angle in angles:
                transform = (
                    _translate(*centre_f)
                    @ _similarity(angle, scale, flip)
                    @ _translate(*-centre_m)
                )
                warped = _warp(moving, _at_level(transform, m_factor, f_factor), fixed.shape)
                filled = np.where(np.isfinite(warped), warped, 0.0)
                shift, _, _ = phase_cross_correlation(
                    fixed_zero, filled - filled.mean(), normalization=None
                )
                shifted = _translate(shift[1] * f_factor, shift[0] * f_factor) @ transform
                level = _at_level(shifted, m_factor, f_factor)
                score = _ncc(fixed, _warp(moving, level, fixed.shape))
                if score > best[0]:
                    best = (score, shifted, flip)
    return best[1], float(best[0]), best[2]


def _refine(
    pyramid: _Pyramid,
    transform: np.ndarray,
    side: int,
    *,
    fixed_scale: bool,
    reach: float = 8.0,
    samples: int = MAX_SAMPLES,
    xtol: float = 0.05,
) -> np.ndarray:
    """Maximise the correlation over a small similarity update at one level (Powell).

    The correlation is taken on the `samples` fixed pixels of largest gradient, the moving
    image read bilinearly at their mapped positions: each evaluation costs the same at every
    level. `reach` bounds the update, in level pixels (rotation as arc at the edge).
    """
    fixed, f_factor = pyramid.level("fixed", side)
    scale = np.sqrt(abs(np.linalg.det(transform[:2, :2])))
    moving, m_factor = pyramid.level("moving", _moving_side(pyramid, scale, f_factor))
    fixed = ndimage.gaussian_filter(fixed, 1.0)
    moving = ndimage.gaussian_filter(moving, 1.0 * f_factor / (scale * m_factor))
    rows, cols = _informative_pixels(fixed, samples)
    values = fixed[rows, cols].astype(np.float64)
    # sample points in original fixed pixels (continuous coordinates)
    points = np.vstack([(cols + 0.5) * f_factor, (rows + 0.5) * f_factor, np.ones(rows.size)])
    # pivot: the moving image's centre, where it lands (rotation then barely moves it)
    height, width = pyramid.moving.shape
    centre = (transform @ np.array([width / 2.0, height / 2.0, 1.0]))[:2]
    span = max(fixed.shape) / 2.0

    def update(params: np.ndarray) -> np.ndarray:
        # params: rotation (and log-scale) as px of arc at the image edge, shift in level px
        full = np.insert(params, 1, 0.0) if fixed_scale else params
        angle, log_scale, dx, dy = full / np.array([span, span, 1.0, 1.0])
        delta = _translate(*(centre + np.array([dx, dy]) * f_factor)) @ _similarity(
            angle, float(np.exp(log_scale)), False
        ) @ _translate(*-centre)
        return delta @ transform

    def cost(params: np.ndarray) -> float:
        mapped = np.linalg.inv(update(params)) @ points / m_factor  # moving level coords
        sampled = ndimage.map_coordinates(
            moving, [mapped[1] - 0.5, mapped[0] - 0.5], order=1, mode="constant",
            cval=np.nan, prefilter=False,
        )
        return -_ncc(values, sampled)

    for _ in range(4):  # an update at its bound is a step on the way: go on from there
        n = 3 if fixed_scale else 4
        result = optimize.minimize(
            cost, np.zeros(n), method="Powell",
            options={"xtol": xtol, "ftol": 1e-7, "maxfev": 800},
            bounds=[(-reach, reach)] * n,
        )
        transform = update(result.x)
        if np.abs(result.x).max() < 0.9 * reach:
            break
    return transform


def _informative_pixels(image: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the `n` pixels of largest gradient (all pixels of a smaller image).

    Flat glass and flat stain say nothing about position; edges and texture do.
    """
    if image.size <= n:
        rows, cols = np.indices(image.shape)
        return rows.ravel(), cols.ravel()
    gradient = np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1)).ravel()
    chosen = np.argpartition(gradient, gradient.size - n)[-n:]
    return np.unravel_index(np.sort(chosen), image.shape)


def _moving_side(pyramid: _Pyramid, scale: float, f_factor: float) -> int:
    """The moving level whose pixels are about as large as the fixed level's."""
    return max(8, int(round(max(pyramid.moving.shape) * scale / f_factor)))


def _scores(pyramid: _Pyramid, transform: np.ndarray, side: int) -> dict[str, float | bool]:
    """Correlation, detail correlation and tissue-mask Dice at the finest level."""
    fixed, f_factor = pyramid.level("fixed", side)
    scale = np.sqrt(abs(np.linalg.det(transform[:2, :2])))
    moving, m_factor = pyramid.level("moving", _moving_side(pyramid, scale, f_factor))
    warped = _warp(moving, _at_level(transform, m_factor, f_factor), fixed.shape)
    inside = np.isfinite(warped)
    filled = np.where(inside, warped, 0.0)

    def detail(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, 1.0) - ndimage.gaussian_filter(image, 4.0)

    detail_moving = np.where(ndimage.binary_erosion(inside, iterations=8), detail(filled), np.nan)
    mask_f, mask_m = _mask(fixed), _mask(filled) & inside
    both = mask_f & inside
    dice = 2.0 * (both & mask_m).sum() / max(both.sum() + mask_m.sum(), 1)
    return {
        "ncc": _ncc(ndimage.gaussian_filter(fixed, 1.0), np.where(inside, warped, np.nan)),
        "detail_ncc": _ncc(detail(fixed), detail_moving),
        "mask_dice": float(dice),
        "overlap_fraction": float(inside.mean()),
        "level_um_factor": float(f_factor),
    }


@dataclass(frozen=True)
class AutoPlacement:
    """The found transform, its QC numbers, and the images it was found on (for the figure)."""

    native_to_wsi: np.ndarray
    qc: dict[str, float | int | str | bool]
    found: AutoRegistration
    fixed: np.ndarray
    moving: np.ndarray
