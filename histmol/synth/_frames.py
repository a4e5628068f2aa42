"""Frame helpers shared by the synthetic writers of platforms placed on the H&E by landmarks.

CosMx, MERSCOPE and Slide-seq report positions in their own micrometre frame and carry no
transform to the H&E, so each writer picks a rigid placement of that frame on the slide (a
rotation: the section never sits square to the scanner) and writes the truth beside the
bundle: `native_to_wsi.csv` (the matrix) and `landmarks.csv` (point pairs with click noise, the
input `--landmarks` expects: native_x, native_y, wsi_x, wsi_y).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from histmol.synth.morphology import SyntheticSlide


def placement(
    slide: SyntheticSlide, centre_um: tuple[float, float], rotation_deg: float
) -> np.ndarray:
    """Native um -> slide px: rotate about `centre_um`, put it at the slide centre, scale."""
    theta = np.deg2rad(rotation_deg)
    c, s = np.cos(theta) / slide.mpp, np.sin(theta) / slide.mpp
    cx, cy = centre_um
    return np.array(
        [
            [c, -s, slide.width / 2.0 - (c * cx - s * cy)],
            [s, c, slide.height / 2.0 - (s * cx + c * cy)],
            [0.0, 0.0, 1.0],
        ]
    )


def to_slide(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map native points through a 3x3 affine."""
    return (
        matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2],
        matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2],
    )


def to_native(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map slide points back into the native frame."""
    return to_slide(np.linalg.inv(matrix), x, y)


def as_written(values: np.ndarray, decimals: int) -> tuple[list[str], np.ndarray]:
    """Fixed-decimal text of `values` and the floats a CSV reader parses back from it."""
    text = [f"{v:.{decimals}f}" for v in np.asarray(values, np.float64)]
    return text, np.array([float(t) for t in text], dtype=np.float64)


def write_landmarks(
    path: Path,
    matrix: np.ndarray,
    native_xy: np.ndarray,
    *,
    noise_px: float,
    seed: int,
) -> Path:
    """Landmark pairs: native points and their slide positions plus Gaussian click noise."""
    rng = np.random.default_rng([int(seed), 53])
    wx, wy = to_slide(matrix, native_xy[:, 0], native_xy[:, 1])
    noise = rng.normal(0.0, noise_px, (2, len(wx)))
    table = pd.DataFrame(
        {
            "native_x": native_xy[:, 0],
            "native_y": native_xy[:, 1],
            "wsi_x": np.round(wx + noise[0], 2),
            "wsi_y": np.round(wy + noise[1], 2),
        }
    )
    table.to_csv(path, index=False)
    return path


def landmark_points(x: np.ndarray, y: np.ndarray, n: int = 8) -> np.ndarray:
    """`n` well-spread points of a unit cloud (its extreme and middle units), native frame."""
    order = [
        np.argmin(x),
        np.argmax(x),
        np.argmin(y),
        np.argmax(y),
        np.argmin(x + y),
        np.argmax(x + y),
        np.argmin(x - y),
        np.argmax(x - y),
    ]
    picked = list(dict.fromkeys(int(i) for i in order))[:n]
    return np.column_stack([x[picked], y[picked]])
