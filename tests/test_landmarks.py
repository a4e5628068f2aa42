"""Least-squares affine fits from landmark pairs: exact recovery, true least squares, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from histmol.errors import RegistrationError
from histmol.landmarks import check_residuals, fit_affine

# rotation 30 deg, anisotropic scale and shear, translation in the 1e4 range
TRUE = np.array([[1.7, -0.9, 12345.0], [1.1, 1.5, -6789.0], [0.0, 0.0, 1.0]])
SRC = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 80.0], [120.0, 95.0], [55.0, 40.0], [-30, 70]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def test_exact_pairs_recover_the_transform() -> None:
    fit = fit_affine(SRC, apply(TRUE, SRC))
    np.testing.assert_allclose(fit.matrix, TRUE, rtol=0, atol=1e-9)
    assert fit.n_pairs == 6 and fit.max < 1e-9 and fit.rms < 1e-9
    assert fit.determinant == pytest.approx(1.7 * 1.5 + 0.9 * 1.1)


def test_three_pairs_are_enough_and_two_are_not() -> None:
    fit = fit_affine(SRC[:3], apply(TRUE, SRC[:3]))
    np.testing.assert_allclose(fit.matrix, TRUE, atol=1e-9)
    with pytest.raises(RegistrationError, match="2 point pair.*at least 3"):
        fit_affine(SRC[:2], apply(TRUE, SRC[:2]))


def test_fit_is_least_squares_over_all_pairs_not_the_first_three() -> None:
    dst = apply(TRUE, SRC)
    dst[4] += [3.0, -4.0]  # one landmark clicked 5 units off
    fit = fit_affine(SRC, dst)
    # the normal-equation solution, computed independently
    design = np.column_stack([SRC, np.ones(len(SRC))])
    solution, *_ = np.linalg.lstsq(design, dst, rcond=None)
    np.testing.assert_allclose(fit.matrix[:2], solution.T, atol=1e-9)
    residuals = np.linalg.norm(design @ solution - dst, axis=1)
    np.testing.assert_allclose(fit.residuals, residuals, atol=1e-9)
    assert fit.rms == pytest.approx(np.sqrt(np.mean(residuals**2)))
    assert fit.max == pytest.approx(residuals.max())
    assert 0 < fit.max < 5.0  # spread over all pairs, smaller than the click error
    assert not np.allclose(fit.matrix, fit_affine(SRC[:3], dst[:3]).matrix)


def test_collinear_or_coincident_points_are_refused() -> None:
    line = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    with pytest.raises(RegistrationError, match="source points are collinear"):
        fit_affine(line, apply(TRUE, line) + [[0, 0], [0, 0], [0, 0], [0, 1]])
    with pytest.raises(RegistrationError, match="destination points are collinear"):
        fit_affine(SRC[:4], line)
    same = np.repeat(SRC[:1], 4, axis=0)
    with pytest.raises(RegistrationError, match="collinear"):
        fit_affine(same, apply(TRUE, same))


def test_mirrored_fit_is_refused_unless_allowed() -> None:
    flip = np.array([[-1.0, 0.0, 500.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    dst = apply(flip, SRC)
    with pytest.raises(RegistrationError, match="mirrors"):
        fit_affine(SRC, dst)
    fit = fit_affine(SRC, dst, allow_mirror=True)
    np.testing.assert_allclose(fit.matrix, flip, atol=1e-9)
    assert fit.determinant == pytest.approx(-1.0)


def test_malformed_point_arrays_are_refused() -> None:
    with pytest.raises(RegistrationError, match="6 source points but 5"):
        fit_affine(SRC, apply(TRUE, SRC)[:5])
    with pytest.raises(RegistrationError, match=r"\(n, 2\)"):
        fit_affine(SRC[:, :1], SRC)
    bad = SRC.copy()
    bad[1, 0] = np.nan
    with pytest.raises(RegistrationError, match="NaN"):
        fit_affine(bad, SRC)


def test_large_coordinates_keep_full_precision() -> None:
    far = SRC * 37.0 + [250_000.0, 180_000.0]
    fit = fit_affine(far, apply(TRUE, far))
    np.testing.assert_allclose(apply(fit.matrix, far), apply(TRUE, far), atol=1e-6)


def test_check_residuals_converts_units_and_names_the_worst_pair() -> None:
    dst = apply(TRUE, SRC)
    dst[2] += [0.0, 40.0]
    fit = fit_affine(SRC, dst)
    worst = check_residuals(fit, max_um=100.0, um_per_px=0.5)
    assert worst == pytest.approx(fit.max * 0.5)
    with pytest.raises(RegistrationError, match=r"landmark pair 2 lies .* um .*limit 5 um"):
        check_residuals(fit, max_um=5.0, um_per_px=0.5)
    with pytest.raises(ValueError):
        check_residuals(fit, max_um=0.0, um_per_px=0.5)
