"""Place a section's units on its WSI: native frame -> WSI level-0 pixels, and the pixel size.

The transform is the adapter's (or the user's) 3x3 affine; this module checks it, applies it,
resolves the WSI's mpp from the best available source and cross-checks it against the mpp
implied by the platform's known unit pitch. Everything it measures goes into `qc`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histmol.errors import RegistrationError, WSIError
from histmol.section import MppSource, Section

MAX_SAMPLE_FOR_PITCH = 20_000


@dataclass(frozen=True)
class SlideGeometry:
    """What registration needs to know of the WSI (kept small so it is testable alone)."""

    path: Path
    width: int
    height: int
    embedded_mpp: float | None
    mpp_discard_reason: str | None = None


@dataclass
class Registration:
    """Units in WSI level-0 pixels, the resolved mpp with its source, and QC numbers."""

    native_to_wsi: np.ndarray
    mpp: float
    mpp_source: MppSource
    x_wsi_px: np.ndarray
    y_wsi_px: np.ndarray
    qc: dict[str, float | int | str | bool] = field(default_factory=dict)

    @property
    def x_um(self) -> np.ndarray:
        """Unit centres in micrometres in the WSI's frame (level-0 px times mpp)."""
        return self.x_wsi_px * self.mpp

    @property
    def y_um(self) -> np.ndarray:
        """Unit centres in micrometres in the WSI's frame."""
        return self.y_wsi_px * self.mpp


def read_transform_csv(path: str | Path) -> np.ndarray:
    """Read a 3x3 affine written as 3 lines of 3 comma- or whitespace-separated numbers.

    The matrix is checked here (`check_affine`), so every error about it names this file.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RegistrationError(f"{path}: cannot read transform: {err}") from err
    rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    try:
        matrix = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError as err:
        raise RegistrationError(f"{path}: transform holds a non-number: {err}") from err
    if matrix.shape != (3, 3):
        raise RegistrationError(
            f"{path}: transform must be 3 rows of 3 numbers, got {matrix.shape}"
        )
    check_affine(matrix, what=f"{path}: transform")  # NaN, projective, singular: name the file
    return matrix


LANDMARK_COLUMNS = ("native_x", "native_y", "wsi_x", "wsi_y")


def read_landmarks_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read landmark pairs: a CSV with columns native_x, native_y, wsi_x, wsi_y (WSI level-0 px).

    Native points are in the platform's native frame (the one its adapter reports units in).
    """
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise RegistrationError(f"{path}: cannot read landmarks: {err}") from err
    missing = [c for c in LANDMARK_COLUMNS if c not in table.columns]
    if missing:
        raise RegistrationError(
            f"{path}: landmarks lack columns {missing}; expected {list(LANDMARK_COLUMNS)}, "
            f"found {list(table.columns)}"
        )
    values = table[list(LANDMARK_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0]) + 2
        raise RegistrationError(f"{path}: line {bad} holds a missing or non-numeric coordinate")
    return values[:, :2], values[:, 2:]


def check_affine(matrix: np.ndarray, *, what: str = "native_to_wsi") -> float:
    """Validate a 3x3 affine and return its linear part's determinant (sign = handedness)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise RegistrationError(f"{what} must be a finite 3x3 matrix, got {matrix.tolist()}")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise RegistrationError(
            f"{what} is not affine: its last row is {matrix[2].tolist()}, expected [0, 0, 1]"
        )
    det = float(np.linalg.det(matrix[:2, :2]))
    scale = float(np.abs(matrix[:2, :2]).max())
    if scale == 0 or abs(det) < 1e-12 * max(scale * scale, 1e-300):
        raise RegistrationError(f"{what} is singular (determinant {det:.3g}): {matrix.tolist()}")
    return det


def apply_affine(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map points through a 3x3 affine (x is the column, y the row)."""
    xs = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]
    ys = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]
    return xs, ys


def median_neighbour_distance(x: np.ndarray, y: np.ndarray) -> float | None:
    """Typical centre-to-centre distance between adjacent units; None with fewer than 2 units.

    The nearest neighbour alone is biased low when positions are noisy (a spot detector's
    output): the minimum of 4-6 noisy distances. So take every neighbour within 1.3x the median
    nearest distance (the 4 of a square grid, the 6 of a hexagonal one, not the diagonals) and
    return the median of those.
    """
    if len(x) < 2:
        return None
    points = np.column_stack([x, y])
    if len(points) > MAX_SAMPLE_FOR_PITCH:
        rng = np.random.default_rng(0)
        query = points[rng.choice(len(points), MAX_SAMPLE_FOR_PITCH, replace=False)]
    else:
        query = points
    from scipy.spatial import cKDTree  # scipy.spatial costs ~0.2 s to import: only when used

    k = min(7, len(points))
    distances, _ = cKDTree(points).query(query, k=k)
    neighbours = distances[:, 1:]
    nearest = neighbours[:, 0][neighbours[:, 0] > 0]
    if not len(nearest):
        return None
    first = float(np.median(nearest))
    close = neighbours[(neighbours > 0) & (neighbours < 1.3 * first)]
    return float(np.median(close))


def array_scale(
    col_um: np.ndarray, row_um: np.ndarray, x_px: np.ndarray, y_px: np.ndarray
) -> tuple[float, float] | None:
    """Pixels per micrometre of the array lattice in the image, and the fit's worst residual (px).

    Fits the affine array (um) -> image (px) by least squares and returns sqrt(|det|) of its
    linear part: exact for any set of 3 or more units not on one line, however far apart. Units
    on one line give the scale along that line. None with fewer than 2 distinct array positions.
    """
    array = np.column_stack([col_um, row_um]).astype(np.float64)
    image = np.column_stack([x_px, y_px]).astype(np.float64)
    if len(np.unique(array, axis=0)) < 2:
        return None
    array_c = array - array.mean(axis=0)
    image_c = image - image.mean(axis=0)
    if np.linalg.matrix_rank(array_c, tol=1e-9 * float(np.abs(array_c).max())) == 2:
        linear, *_ = np.linalg.lstsq(array_c, image_c, rcond=None)
        scale = float(np.sqrt(abs(np.linalg.det(linear))))
        fitted = array_c @ linear
    else:  # collinear: one direction, t = position along it
        direction = array_c[np.argmax(np.hypot(*array_c.T))]
        t = array_c @ (direction / np.hypot(*direction))
        along = (t @ image_c) / (t @ t)
        scale = float(np.hypot(*along))
        fitted = np.outer(t, along)
    residual = float(np.hypot(*(image_c - fitted).T).max())
    return scale, residual


def register(
    section: Section,
    slide: SlideGeometry,
    *,
    native_to_wsi: np.ndarray | None = None,
    mpp: float | None = None,
    mpp_tolerance: float = 0.05,
) -> Registration:
    """Place the section's units on the slide and resolve its mpp.

    mpp sources, first usable wins: `mpp` given by the user; the WSI's embedded value; the
    bundle's own scale (`native_um_per_unit` carried through the transform); the unit pitch.
    The first two non-user sources are cross-checked against the pitch estimate: a
    disagreement beyond `mpp_tolerance` fails unless the user gave `mpp`.
    """
    matrix = native_to_wsi if native_to_wsi is not None else section.native_to_wsi
    matrix = np.eye(3) if matrix is None else np.asarray(matrix, dtype=np.float64)
    det = check_affine(matrix)
    x_native = section.units["x_native"].to_numpy(np.float64)
    y_native = section.units["y_native"].to_numpy(np.float64)
    x_wsi, y_wsi = apply_affine(matrix, x_native, y_native)
    qc: dict[str, float | int | str | bool] = {
        "transform_det": det,
        "transform_mirrored": det < 0,
    }

    _check_inside(x_wsi, y_wsi, slide, qc)

    candidates: dict[str, float] = {}
    if slide.embedded_mpp is not None:
        candidates["embedded"] = slide.embedded_mpp
    if section.native_um_per_unit is not None:
        candidates["scalefactors"] = section.native_um_per_unit / np.sqrt(abs(det))
    pitch_mpp, pitch_basis = _pitch_mpp(section, x_wsi, y_wsi, qc)
    if pitch_mpp is not None:
        candidates["estimated_from_pitch"] = pitch_mpp
    for source, value in candidates.items():
        qc[f"mpp_{source}"] = float(value)
    if slide.mpp_discard_reason:
        qc["mpp_embedded_discarded"] = slide.mpp_discard_reason

    if section.pitch_um is None:
        pitch_problem = f"{section.platform} states no unit pitch for this array layout"
    else:
        pitch_problem = "fewer than 2 units to measure the unit pitch on"
    resolved, source = _resolve_mpp(candidates, mpp, slide, pitch_problem)
    qc["mpp"] = resolved
    qc["mpp_source"] = source
    pitch_estimate = candidates.get("estimated_from_pitch")
    if pitch_estimate is not None:
        for checked in ("embedded", "scalefactors"):
            if checked not in candidates:
                continue
            disagreement = abs(candidates[checked] / pitch_estimate - 1.0)
            qc[f"mpp_{checked}_vs_pitch"] = disagreement
            if disagreement > mpp_tolerance and mpp is None:
                raise RegistrationError(
                    f"{slide.path}: the {checked} mpp {candidates[checked]:.4f} um/px disagrees "
                    f"by {disagreement:.1%} with {pitch_estimate:.4f} um/px implied by "
                    f"{pitch_basis} (tolerance "
                    f"{mpp_tolerance:.0%}); check the transform, or pass --mpp to override"
                )
    return Registration(matrix, resolved, source, x_wsi, y_wsi, qc)


def _pitch_mpp(
    section: Section,
    x_wsi: np.ndarray,
    y_wsi: np.ndarray,
    qc: dict[str, float | int | str | bool],
) -> tuple[float | None, str]:
    """The mpp the unit lattice implies, and what it rests on (for messages).

    Array indices first (exact on any subset); the median neighbour distance only for
    platforms without them (it measures gaps, not the pitch, on sparse subsets).
    """
    lattice = section.array_lattice
    if lattice is not None:
        units = section.units
        fit = array_scale(
            units[lattice.col].to_numpy(np.float64) * lattice.col_step_um,
            units[lattice.row].to_numpy(np.float64) * lattice.row_step_um,
            x_wsi,
            y_wsi,
        )
        if fit is not None:
            px_per_um, residual = fit
            qc["pitch_source"] = "array_index"
            qc["array_fit_residual_wsi_px"] = residual
            return 1.0 / px_per_um, (
                f"the array indices ({lattice.col}, {lattice.row}: {lattice.col_step_um:g} x "
                f"{lattice.row_step_um:g} um per step) of {section.platform}"
            )
    if section.pitch_um is None:
        return None, ""
    pitch_px = median_neighbour_distance(x_wsi, y_wsi)
    if not pitch_px:
        return None, ""
    qc["pitch_source"] = "neighbour_distance"
    return section.pitch_um / pitch_px, (
        f"the {section.pitch_um:g} um unit pitch of {section.platform}"
    )


def _check_inside(
    x_wsi: np.ndarray,
    y_wsi: np.ndarray,
    slide: SlideGeometry,
    qc: dict[str, float | int | str | bool],
) -> None:
    outside = (x_wsi < 0) | (y_wsi < 0) | (x_wsi >= slide.width) | (y_wsi >= slide.height)
    qc["n_units_outside_image"] = int(outside.sum())
    if outside.any():
        first = np.flatnonzero(outside)[:3]
        examples = ", ".join(f"({x_wsi[i]:.1f}, {y_wsi[i]:.1f})" for i in first)
        raise RegistrationError(
            f"{slide.path}: {int(outside.sum())} of {len(x_wsi)} unit centres fall outside the "
            f"{slide.width} x {slide.height} px image (e.g. {examples}); the transform is wrong "
            "(axes swapped or flipped?) or the image is not the one the bundle was made with"
        )


def _resolve_mpp(
    candidates: dict[str, float], user_mpp: float | None, slide: SlideGeometry, pitch_problem: str
) -> tuple[float, MppSource]:
    if user_mpp is not None:
        return float(user_mpp), "user"
    for source in ("embedded", "scalefactors", "estimated_from_pitch"):
        if source in candidates:
            return float(candidates[source]), source  # type: ignore[return-value]
    reason = slide.mpp_discard_reason or "it records no pixel size"
    raise WSIError(
        slide.path,
        f"no usable pixel size: {reason}, the bundle states no scale, and {pitch_problem}; "
        "pass --mpp",
    )
