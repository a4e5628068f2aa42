"""Least-squares affine transforms from landmark pairs, with residuals for QC.

Why: several platforms place the H&E through hand-picked point pairs rather than a matrix (Xenium
Explorer keypoints; `--landmarks` for CosMx, MERSCOPE, Slide-seq). A fit over all pairs, not the
first three, averages out click error, and its residuals say how much to trust it. Mirrored fits
are refused unless asked for: a mirror between a section and its own H&E means a swapped axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histmol.errors import RegistrationError

MIN_PAIRS = 3
COLLINEAR_RATIO = 1e-6  # smallest / largest singular value of the centred points


@dataclass(frozen=True)
class LandmarkFit:
    """A fitted 3x3 affine `matrix` (src -> dst) and each pair's residual in dst units."""

    matrix: np.ndarray
    residuals: np.ndarray
    rms: float
    max: float

    @property
    def n_pairs(self) -> int:
        """Number of point pairs the fit used."""
        return len(self.residuals)

    @property
    def determinant(self) -> float:
        """Determinant of the linear part (negative: the fit mirrors)."""
        return float(np.linalg.det(self.matrix[:2, :2]))


def _points(values: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(values, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise RegistrationError(f"{name} points must be an (n, 2) array, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise RegistrationError(f"{name} points hold NaN or infinite values")
    return points


def _check_spread(points: np.ndarray, name: str) -> None:
    centred = points - points.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    if singular[0] == 0 or singular[1] / singular[0] < COLLINEAR_RATIO:
        raise RegistrationError(
            f"the {len(points)} {name} points are collinear (or coincide): an affine transform "
            "needs at least 3 points that span an area"
        )


def fit_affine(src: np.ndarray, dst: np.ndarray, *, allow_mirror: bool = False) -> LandmarkFit:
    """Fit the affine A minimising sum |A(src_i) - dst_i|^2 over all pairs.

    Raises RegistrationError for fewer than 3 pairs, collinear points on either side, or a
    mirrored fit (negative determinant) unless `allow_mirror`.
    """
    src_pts, dst_pts = _points(src, "source"), _points(dst, "destination")
    if len(src_pts) != len(dst_pts):
        raise RegistrationError(
            f"{len(src_pts)} source points but {len(dst_pts)} destination points: pairs must match"
        )
    if len(src_pts) < MIN_PAIRS:
        raise RegistrationError(
            f"{len(src_pts)} point pair(s) given; an affine fit needs at least {MIN_PAIRS}"
        )
    _check_spread(src_pts, "source")
    _check_spread(dst_pts, "destination")
    # Centring first keeps the normal equations well conditioned for coordinates in the 1e5 range.
    src_mean, dst_mean = src_pts.mean(axis=0), dst_pts.mean(axis=0)
    linear_t, *_ = np.linalg.lstsq(src_pts - src_mean, dst_pts - dst_mean, rcond=None)
    linear = linear_t.T
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = dst_mean - linear @ src_mean
    det = float(np.linalg.det(linear))
    if det < 0 and not allow_mirror:
        raise RegistrationError(
            f"the fitted transform mirrors (determinant {det:.4g}): source and destination "
            "points disagree in handedness; check that x and y are not swapped or flipped"
        )
    mapped = src_pts @ linear.T + matrix[:2, 2]
    residuals = np.hypot(*(mapped - dst_pts).T)
    return LandmarkFit(
        matrix=matrix,
        residuals=residuals,
        rms=float(np.sqrt(np.mean(residuals**2))),
        max=float(residuals.max()),
    )


def check_residuals(fit: LandmarkFit, max_um: float, um_per_px: float) -> float:
    """Return the largest residual in um; raise RegistrationError above `max_um`.

    `um_per_px` converts the fit's destination units to micrometres.
    """
    if not max_um > 0 or not um_per_px > 0:
        raise ValueError(f"max_um and um_per_px must be positive, got {max_um}, {um_per_px}")
    worst_um = fit.max * um_per_px
    if worst_um > max_um:
        worst = int(np.argmax(fit.residuals))
        raise RegistrationError(
            f"landmark pair {worst} lies {worst_um:.1f} um from where the fitted transform puts "
            f"it (rms {fit.rms * um_per_px:.1f} um over {fit.n_pairs} pairs; limit {max_um:g} um): "
            "a point was misplaced or the pairs are not in the same order on both sides"
        )
    return worst_um
