"""Image pairs with a known affine, for testing and benchmarking automatic registration.

Why: `histmol.autoregister` must be measured against ground truth. A case is an H&E thumbnail of
a synthetic slide (the fixed image, with its scale to WSI level 0) and the platform's own image:
the same tissue under a random rotation, flip, scale and translation, cropped, with another stain
balance, blur and noise (Visium's hires/lowres PNG), or a DAPI-like image of the same nuclei
(Xenium / CosMx / MERSCOPE morphology image). All in memory; nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from histmol.synth.morphology import TissueModel

Modality = Literal["he", "nuclei"]


@dataclass(frozen=True)
class RegistrationCase:
    """One pair with its truth: `true_native_to_wsi` is what registration must recover."""

    fixed: np.ndarray  # RGB H&E thumbnail
    fixed_to_wsi: np.ndarray
    moving: np.ndarray  # RGB (he) or 2-D uint16 (nuclei)
    moving_to_native: np.ndarray
    true_native_to_wsi: np.ndarray
    modality: Modality
    native_size: tuple[float, float]  # (width, height) of the moving image in native units

    def unit_error_wsi_px(self, native_to_wsi: np.ndarray, n: int = 12) -> np.ndarray:
        """Distances (WSI px) between true and found positions of an n x n grid of native points."""
        w, h = self.native_size
        x, y = np.meshgrid(np.linspace(0, w, n), np.linspace(0, h, n))
        points = np.vstack([x.ravel(), y.ravel(), np.ones(x.size)])
        return np.hypot(*((native_to_wsi @ points)[:2] - (self.true_native_to_wsi @ points)[:2]))


def similarity(angle: float, scale: float, flip: bool, tx: float, ty: float) -> np.ndarray:
    """3x3 affine: mirror x (if `flip`), rotate by `angle` (radians), scale, then translate."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    out = np.eye(3)
    out[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([-1.0 if flip else 1.0, 1.0])
    out[:2, 2] = (tx, ty)
    return out


def warp_image(
    source: np.ndarray, image_to_source: np.ndarray, shape: tuple[int, int], fill: float
) -> np.ndarray:
    """Sample `source` (2-D or RGB) at the pixels of an image of `shape` (bilinear, float32).

    Continuous coordinates: pixel edges at integers, so pixel (i, j) is centred on (j+.5, i+.5).
    """
    jj, ii = np.meshgrid(np.arange(shape[1]) + 0.5, np.arange(shape[0]) + 0.5)
    m = image_to_source
    x = m[0, 0] * jj + m[0, 1] * ii + m[0, 2] - 0.5
    y = m[1, 0] * jj + m[1, 1] * ii + m[1, 2] - 0.5
    planes = source[..., None] if source.ndim == 2 else source
    out = np.stack(
        [
            ndimage.map_coordinates(planes[..., c].astype(np.float32), [y, x], order=1,
                                    mode="constant", cval=fill)
            for c in range(planes.shape[-1])
        ],
        axis=-1,
    )
    return out[..., 0] if source.ndim == 2 else out


def make_case(
    model: TissueModel,
    source: np.ndarray,
    rng: np.random.Generator,
    *,
    modality: Modality = "he",
    wsi_mpp: float = 0.5,
    thumb_factor: int = 2,
    moving_um_per_px: tuple[float, float] = (3.0, 6.0),
    crop: float = 0.8,
) -> RegistrationCase:
    """A random case over `source`, the model's rendering of its whole area at `model.mpp`.

    The WSI is taken to be at `wsi_mpp` um/px (level 0), the fixed image `source` downsampled by
    `thumb_factor`. The moving image covers a `crop` fraction of the tissue field at a random
    pixel size in `moving_um_per_px`, any angle, either handedness, shifted up to 5 % of the
    field; its native frame is 4x its pixels (a lowres PNG of a full-resolution frame).
    """
    height, width = source.shape[:2]
    source_to_wsi = np.diag([model.mpp / wsi_mpp, model.mpp / wsi_mpp, 1.0])
    f = thumb_factor
    fixed = source[: height // f * f, : width // f * f].reshape(
        height // f, f, width // f, f, 3
    ).mean(axis=(1, 3))
    fixed_to_wsi = source_to_wsi @ np.diag([f, f, 1.0])
    px_um = rng.uniform(*moving_um_per_px)
    scale = px_um / model.mpp  # source px per moving px
    shape = (int(height * crop / scale), int(width * crop / scale))
    centre = np.array([width, height]) / 2.0 + rng.uniform(-0.05, 0.05, 2) * (width, height)
    rotate = similarity(rng.uniform(0, 2 * np.pi), scale, bool(rng.random() < 0.5), 0.0, 0.0)
    offset = centre - rotate[:2, :2] @ np.array([shape[1], shape[0]]) / 2.0
    moving_to_source = _translate(*offset) @ rotate
    if modality == "he":
        moving = _stain_variant(warp_image(source, moving_to_source, shape, 242.0), rng)
    else:
        moving = _dapi_like(model, moving_to_source, shape, scale, rng)
    moving_to_native = np.diag([4.0, 4.0, 1.0])
    truth = source_to_wsi @ moving_to_source @ np.linalg.inv(moving_to_native)
    return RegistrationCase(
        np.clip(fixed, 0, 255).astype(np.uint8), fixed_to_wsi, moving, moving_to_native, truth,
        modality, (shape[1] * 4.0, shape[0] * 4.0),
    )


def unrelated_case(case: RegistrationCase, other: RegistrationCase) -> RegistrationCase:
    """`case`'s fixed image against `other`'s moving image: nothing to find, must be refused."""
    return RegistrationCase(
        case.fixed, case.fixed_to_wsi, other.moving, other.moving_to_native,
        case.true_native_to_wsi, other.modality, other.native_size,
    )


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _stain_variant(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another scan of the same glass: other stain balance and exposure, blur, noise."""
    od = -np.log10(np.clip(rgb / 255.0, 1 / 255.0, 1.0))
    od *= rng.uniform(0.8, 1.2, 3)  # per-channel stain strength
    blurred = ndimage.gaussian_filter(10.0 ** (-od) * 255.0, (rng.uniform(0.3, 1.0),) * 2 + (0,))
    noisy = blurred * rng.uniform(0.92, 1.05) + rng.normal(0.0, 3.0, blurred.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _dapi_like(
    model: TissueModel, moving_to_source: np.ndarray, shape: tuple[int, int], scale: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A DAPI-like 16-bit image of the model's nuclei under the same placement.

    Nuclei are rendered at the model's resolution over the moving image's footprint, then
    averaged down to the moving pixels (a camera integrates), blurred, with a faint tissue
    autofluorescence and shot noise.
    """
    corners = moving_to_source @ np.array(
        [[0, shape[1], 0, shape[1]], [0, 0, shape[0], shape[0]], [1, 1, 1, 1]], float
    )
    x0 = int(np.clip(np.floor(corners[0].min()), 0, model.width - 1))
    y0 = int(np.clip(np.floor(corners[1].min()), 0, model.height - 1))
    x1 = int(np.clip(np.ceil(corners[0].max()), x0 + 1, model.width))
    y1 = int(np.clip(np.ceil(corners[1].max()), y0 + 1, model.height))
    nuclei = model.nuclei(x0, y0, x1 - x0, y1 - y0)
    tissue = (model.region_at(*np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)) > 0)
    signal = np.minimum(nuclei, 1.0) + 0.08 * tissue
    # a camera pixel integrates its area (an odd window: no half-pixel shift)
    signal = ndimage.uniform_filter(signal, 2 * round(scale / 2) + 1)
    placed = _translate(-x0, -y0) @ moving_to_source
    image = warp_image(signal, placed, shape, 0.0)
    image = ndimage.gaussian_filter(image, rng.uniform(0.3, 0.8))
    counts = rng.poisson(np.clip(image, 0, None) * 3000.0 + 100.0)
    return np.clip(counts, 0, 65535).astype(np.uint16)
