"""A deterministic tissue model that renders H&E-like pixels and says which region is where.

Why: tests and benchmarks need slides whose morphology is known (a label per location) and
drives expression, at any size, without storing pixels. Everything is a pure function of
(seed, global pixel coordinates): smooth random fields on a coarse grid (one node per
`label_um`) are bilinearly interpolated at 1 um blocks and arg-maxed into regions; nuclei come
from per-cell hashes on fixed grids aligned to the slide origin; fibre and grain textures are
periodic arrays indexed by global coordinates. So a region renders identically whichever tile
or call it falls in, and adjacent tiles join exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from histmol.synth.pyramid import write_pyramidal_tiff

REGION_NAMES = ("tumour", "stroma", "immune", "necrosis", "gland")
BACKGROUND = "background"
_CHUNK = 1024  # columns rendered at once: keeps float32 temporaries in cache
_LUT_LEVELS = 128
_H_MAX, _E_MAX = 2.0, 1.2
# Optical density per unit stain (R, G, B), log10: haematoxylin purple-blue, eosin pink.
_H_OD = np.array([0.60, 0.75, 0.30])
_E_OD = np.array([0.12, 0.80, 0.32])
_GLASS_OD = 0.025


@dataclass(frozen=True)
class _Style:
    """Stain and nuclei parameters of one region (concentrations in OD units)."""

    eosin: float
    haem: float
    fibre: float  # fibre texture amplitude on eosin
    grain: float  # fine noise amplitude
    big_p: float  # probability that a large-grid cell holds a nucleus
    big_r: tuple[float, float]  # major semi-axis range, um
    big_aspect: tuple[float, float]
    big_dark: float
    small_p: float  # same for the small grid (lymphocytes, debris)
    small_r: tuple[float, float]
    small_dark: float


_STYLES: dict[str, _Style] = {  # tumour: dense large nuclei; immune: packed lymphocytes; ...
    BACKGROUND: _Style(0.012, 0.004, 0.0, 0.008, 0.0, (1, 1), (1, 1), 0.0, 0.0, (1, 1), 0.0),
    "tumour": _Style(
        0.26, 0.15, 0.10, 0.03, 0.92, (3.8, 5.2), (1.0, 1.5), 0.95, 0.08, (2.2, 2.8), 1.3
    ),
    "stroma": _Style(
        0.38, 0.03, 0.45, 0.025, 0.22, (3.5, 5.0), (2.5, 4.0), 0.85, 0.06, (2.2, 2.8), 1.2
    ),
    "immune": _Style(
        0.22, 0.08, 0.08, 0.03, 0.06, (3.5, 4.5), (1.0, 1.3), 0.8, 0.85, (2.3, 2.9), 1.45
    ),
    "necrosis": _Style(
        0.34, 0.05, 0.10, 0.07, 0.08, (3.0, 4.0), (1.0, 1.4), 0.25, 0.45, (0.8, 1.6), 1.1
    ),
    "gland": _Style(
        0.30, 0.10, 0.12, 0.03, 0.70, (3.2, 4.2), (1.4, 2.0), 0.8, 0.05, (2.2, 2.8), 1.2
    ),
}
_BIG_CELL_UM, _SMALL_CELL_UM = 14.0, 7.5


def _uniform(seed: int, salt: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (seed, salt, cell row, cell column)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(ix, np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.asarray(iy, np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        h ^= np.uint64((seed * 0x165667B19E3779F9 + salt * 0x27D4EB2F165667C5) % 2**64)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std gaussian-smoothed noise (float64)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-12)


def _periodic_texture(
    rng: np.random.Generator, size: int, sigma: tuple[float, float]
) -> np.ndarray:
    """Seamlessly periodic smoothed noise, zero-mean, unit std (wrap-mode filtering)."""
    f = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _stain_lut() -> np.ndarray:
    """RGB for each (haematoxylin, eosin) level pair: Beer-Lambert in log10 optical density."""
    h = np.linspace(0.0, _H_MAX, _LUT_LEVELS)[:, None, None]
    e = np.linspace(0.0, _E_MAX, _LUT_LEVELS)[None, :, None]
    od = _GLASS_OD + h * _H_OD + e * _E_OD
    return np.round(255.0 * 10.0 ** (-od)).astype(np.uint8).reshape(-1, 3)


class TissueModel:
    """Fields, labels and textures of one synthetic section; renders any level-0 region."""

    def __init__(
        self,
        width: int,
        height: int,
        *,
        mpp: float,
        seed: int = 0,
        n_regions: int = 4,
        label_um: float = 16.0,
    ) -> None:
        if not 1 <= n_regions <= len(REGION_NAMES):
            raise ValueError(f"n_regions must be 1..{len(REGION_NAMES)}, got {n_regions}")
        self.width, self.height = int(width), int(height)
        self.mpp, self.seed = float(mpp), int(seed)
        self.label_um = float(label_um)
        self.region_names = (BACKGROUND, *REGION_NAMES[:n_regions])
        self.block = max(1, round(1.0 / self.mpp))  # label resolution: ~1 um blocks
        ny = int(np.ceil(self.height * self.mpp / self.label_um)) + 1
        nx = int(np.ceil(self.width * self.mpp / self.label_um)) + 1
        rng = np.random.default_rng([self.seed, 1])
        yy = ((np.arange(ny) + 0.5) * self.label_um / (self.height * self.mpp) - 0.5)[:, None]
        xx = ((np.arange(nx) + 0.5) * self.label_um / (self.width * self.mpp) - 0.5)[None, :]
        r2 = (xx / 0.46) ** 2 + (yy / 0.46) ** 2
        coarse = _smooth_noise(rng, (ny, nx), 600.0 / self.label_um)
        fine = _smooth_noise(rng, (ny, nx), 120.0 / self.label_um)
        tissue = 1.0 - r2 + 0.45 * coarse + 0.18 * fine
        regions = [_smooth_noise(rng, (ny, nx), 450.0 / self.label_um) for _ in range(n_regions)]
        self.fields = np.stack([tissue, *regions]).astype(np.float64)
        self.labels = self._argmax(self.fields)
        trng = np.random.default_rng([self.seed, 2])
        self._fibre = self._fibre_texture(trng)
        self._grain = _periodic_texture(trng, 509, (0.6, 0.6)).astype(np.float32)
        names = self.region_names
        styles = [_STYLES[n] for n in names]
        self._eosin = np.array([s.eosin for s in styles], np.float32)
        self._haem = np.array([s.haem for s in styles], np.float32)
        self._fib_amp = np.array([s.eosin * s.fibre for s in styles], np.float32)
        self._grain_amp = np.array([s.grain for s in styles], np.float32)
        self._lut = _stain_lut()

    def _fibre_texture(self, rng: np.random.Generator) -> np.ndarray:
        """Wavy collagen-like bundles: oriented noise (periodic FFT filter), sine-sheared rows."""
        size = 1024
        k = np.fft.fftfreq(size)
        ky, kx = k[:, None], k[None, :]
        across, along = 0.6 / self.mpp, 6.0 / self.mpp
        out = np.zeros((size, size))
        for angle, weight in ((0.45, 1.0), (-0.9, 0.35)):
            k_along = kx * np.cos(angle) + ky * np.sin(angle)
            k_across = -kx * np.sin(angle) + ky * np.cos(angle)
            gain = np.exp(-2 * np.pi**2 * ((along * k_along) ** 2 + (across * k_across) ** 2))
            f = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * gain).real
            out += weight * f / f.std()
        i = np.arange(size)
        shift = np.round(0.04 * size * np.sin(2 * np.pi * 2 * i / size)).astype(np.int64)
        out = out[i[:, None], (i[None, :] - shift[:, None]) % size]
        out /= out.std()
        return np.tanh(1.2 * out).astype(np.float32)

    @staticmethod
    def _argmax(f: np.ndarray) -> np.ndarray:
        """Label 0 where the tissue field is <= 0, else 1 + the strongest region field."""
        return np.where(f[0] > 0, 1 + np.argmax(f[1:], axis=0), 0).astype(np.uint8)

    def _node_coords(self, um: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lower node, upper node and weight for bilinear interpolation at `um`."""
        f = np.clip(um / self.label_um - 0.5, 0.0, n - 1.0)
        i0 = np.minimum(np.floor(f).astype(np.int64), n - 1)
        return i0, np.minimum(i0 + 1, n - 1), f - i0

    def _block_um(self, index: np.ndarray) -> np.ndarray:
        """Centre (um) of label blocks with the given indices along one axis."""
        return (np.asarray(index, np.float64) * self.block + self.block / 2.0) * self.mpp

    def _labels_grid(self, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
        """Labels of a grid of blocks (rows `by`, columns `bx`); matches `region_at` exactly."""
        i0, i1, ty = self._node_coords(self._block_um(by), self.fields.shape[1])
        j0, j1, tx = self._node_coords(self._block_um(bx), self.fields.shape[2])
        f = self.fields
        g = f[:, i0, :] * (1.0 - ty)[None, :, None] + f[:, i1, :] * ty[None, :, None]
        v = g[:, :, j0] * (1.0 - tx) + g[:, :, j1] * tx
        return self._argmax(v)

    def region_at(self, x_px: np.ndarray | float, y_px: np.ndarray | float) -> np.ndarray:
        """Region label (0 = background) at level-0 pixel positions, as rendered."""
        x = np.asarray(x_px, np.float64)
        y = np.asarray(y_px, np.float64)
        shape = np.broadcast(x, y).shape
        x, y = np.broadcast_to(x, shape).ravel(), np.broadcast_to(y, shape).ravel()
        bx = np.floor(np.clip(x, 0, self.width - 1e-9) / self.block)
        by = np.floor(np.clip(y, 0, self.height - 1e-9) / self.block)
        i0, i1, ty = self._node_coords(self._block_um(by), self.fields.shape[1])
        j0, j1, tx = self._node_coords(self._block_um(bx), self.fields.shape[2])
        f = self.fields
        g0 = f[:, i0, j0] * (1.0 - ty) + f[:, i1, j0] * ty
        g1 = f[:, i0, j1] * (1.0 - ty) + f[:, i1, j1] * ty
        return self._argmax(g0 * (1.0 - tx) + g1 * tx).astype(np.int64).reshape(shape)

    def _texture(self, tex: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A periodic texture sampled at global pixels [y, y+h) x [x, x+w)."""
        n = tex.shape[0]
        rows = np.take(tex, np.arange(y, y + h) % n, axis=0)
        return np.take(rows, np.arange(x, x + w) % n, axis=1)

    def _nuclei(self, x: int, y: int, w: int, h: int, small: bool) -> np.ndarray:
        """Haematoxylin added by the nuclei of one grid (one nucleus at most per cell)."""
        cell = max(4, round((_SMALL_CELL_UM if small else _BIG_CELL_UM) / self.mpp))
        cx0, cy0 = x // cell, y // cell
        ncx, ncy = (x + w - 1) // cell - cx0 + 1, (y + h - 1) // cell - cy0 + 1
        ix = np.arange(cx0, cx0 + ncx)[None, :]
        iy = np.arange(cy0, cy0 + ncy)[:, None]
        u = [_uniform(self.seed, (7 if small else 3) * 16 + k, iy, ix) for k in range(7)]
        # each nucleus takes the region of the label block holding its cell's centre
        lab = self._labels_grid(
            np.floor((ix[0] * cell + cell / 2.0) / self.block),
            np.floor((iy[:, 0] * cell + cell / 2.0) / self.block),
        )
        styles = [_STYLES[n] for n in self.region_names]
        p = np.array([s.small_p if small else s.big_p for s in styles])[lab]
        rng_r = np.array([s.small_r if small else s.big_r for s in styles])[lab]
        asp = np.array([(1.0, 1.3) if small else s.big_aspect for s in styles])[lab]
        dark = np.array([s.small_dark if small else s.big_dark for s in styles])[lab]
        a = (rng_r[..., 0] + (rng_r[..., 1] - rng_r[..., 0]) * u[1]) / self.mpp  # major, px
        a = np.minimum(a, cell / 2.0 - 1.0)
        b = a / (asp[..., 0] + (asp[..., 1] - asp[..., 0]) * u[2])
        theta = np.pi * u[3]
        margin = a + 0.5
        cxp = ix * cell + margin + (cell - 2 * margin) * u[4]
        cyp = iy * cell + margin + (cell - 2 * margin) * u[5]
        dark = np.where(u[0] < p, dark * (0.8 + 0.4 * u[6]), 0.0)
        c, s = np.cos(theta), np.sin(theta)
        sharp = b / 2.0  # soft edge about one pixel wide
        qa = (c**2 / a**2 + s**2 / b**2) * sharp
        qb = 2 * c * s * (1 / a**2 - 1 / b**2) * sharp
        qc = (s**2 / a**2 + c**2 / b**2) * sharp
        local = np.arange(cell) + 0.5
        dx = (ix * cell)[:, :, None] + local[None, None, :] - cxp[:, :, None]  # (ncy, ncx, cell)
        dy = (iy * cell)[:, :, None] + local[None, None, :] - cyp[:, :, None]  # (ncy, 1|ncx, cell)
        dy = np.broadcast_to(dy, (ncy, ncx, cell))
        f32 = np.float32
        adx2 = (qa[:, :, None] * dx * dx).astype(f32)[:, None, :, :]
        bdx = (qb[:, :, None] * dx).astype(f32)[:, None, :, :]
        cdy2 = (qc[:, :, None] * dy * dy).astype(f32).transpose(0, 2, 1)[:, :, :, None]
        dyv = dy.astype(f32).transpose(0, 2, 1)[:, :, :, None]
        q = bdx * dyv  # (ncy, cell, ncx, cell): full resolution from here on
        q += adx2
        q += cdy2
        m = (0.5 + sharp).astype(f32)[:, None, :, None] - q
        np.clip(m, 0.0, 1.0, out=m)
        m *= dark.astype(f32)[:, None, :, None]
        full = m.reshape(ncy * cell, ncx * cell)
        oy, ox = y - cy0 * cell, x - cx0 * cell
        return full[oy : oy + h, ox : ox + w]

    def nuclei(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Nuclear stain density (float32 >= 0) of level-0 pixels [y, y+h) x [x, x+w).

        The same nuclei `render` draws in haematoxylin: what a DAPI image of the section shows.
        """
        bs = self.block
        bx0, by0 = x // bs, y // bs
        blab = self._labels_grid(
            np.arange(bx0, (x + w - 1) // bs + 1), np.arange(by0, (y + h - 1) // bs + 1)
        )
        lab = np.repeat(np.repeat(blab, bs, axis=0), bs, axis=1)
        lab = lab[y - by0 * bs : y - by0 * bs + h, x - bx0 * bs : x - bx0 * bs + w]
        nuc = self._nuclei(x, y, w, h, small=False) + self._nuclei(x, y, w, h, small=True)
        nuc[lab == 0] = 0.0
        return nuc.astype(np.float32)

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """H&E-like RGB uint8 (h, w, 3) of level-0 pixels [y, y+h) x [x, x+w)."""
        out = np.empty((h, w, 3), np.uint8)
        for c0 in range(0, w, _CHUNK):
            cw = min(_CHUNK, w - c0)
            out[:, c0 : c0 + cw] = self._render_chunk(x + c0, y, cw, h)
        return out

    def _render_chunk(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Render one column chunk: stain concentrations per pixel, then a colour lookup."""
        bs = self.block
        bx0, by0 = x // bs, y // bs
        bx1, by1 = (x + w - 1) // bs + 1, (y + h - 1) // bs + 1
        blab = self._labels_grid(np.arange(bx0, bx1), np.arange(by0, by1))
        lab = np.repeat(np.repeat(blab, bs, axis=0), bs, axis=1)
        lab = lab[y - by0 * bs : y - by0 * bs + h, x - bx0 * bs : x - bx0 * bs + w]
        fib = self._texture(self._fibre, x, y, w, h)
        grain = self._texture(self._grain, x, y, w, h)
        nuc = self._nuclei(x, y, w, h, small=False) + self._nuclei(x, y, w, h, small=True)
        nuc[lab == 0] = 0.0  # the section's edge cuts nuclei: none on the glass
        # np.take is several times faster than fancy indexing for these gathers.
        grain_amp = np.take(self._grain_amp, lab)
        e = np.take(self._fib_amp, lab)
        e *= fib
        e += np.take(self._eosin, lab)
        e += grain_amp * grain
        e *= 1.0 - 0.6 * np.minimum(nuc, 1.0)
        grain *= 0.2
        grain += 1.0
        nuc *= grain
        nuc += np.take(self._haem, lab)
        grain_amp *= 0.5 * 5.0  # 0.5 * amp * raw grain, and grain now holds 1 + 0.2 * raw
        grain -= 1.0
        grain *= grain_amp
        nuc += grain
        scale_h, scale_e = (_LUT_LEVELS - 1) / _H_MAX, (_LUT_LEVELS - 1) / _E_MAX
        hq = np.clip(nuc * scale_h + 0.5, 0, _LUT_LEVELS - 1).astype(np.int32)
        eq = np.clip(e * scale_e + 0.5, 0, _LUT_LEVELS - 1).astype(np.int32)
        hq *= _LUT_LEVELS
        hq += eq
        return np.take(self._lut, hq, axis=0)


@lru_cache(maxsize=8)
def tissue_model(
    width: int, height: int, mpp: float, seed: int, n_regions: int, label_um: float
) -> TissueModel:
    """Cached model: building one costs ~0.1-0.5 s, and slides reuse it for rendering."""
    return TissueModel(width, height, mpp=mpp, seed=seed, n_regions=n_regions, label_um=label_um)


@dataclass(frozen=True, eq=False)
class SyntheticSlide:
    """A written synthetic WSI plus its ground-truth region map.

    `labels[i, j]` is the region at the label-grid node centred on
    ((j + 0.5) * label_um, (i + 0.5) * label_um) micrometres; `region_names[k]` names label k
    (0 = background). `region_at` gives the exact label used for rendering any pixel.
    """

    path: Path
    mpp: float
    width: int
    height: int
    labels: np.ndarray = field(repr=False)
    label_um: float
    region_names: tuple[str, ...]
    seed: int

    @cached_property
    def model(self) -> TissueModel:
        """The tissue model that rendered this slide (rebuilt from the seed when needed)."""
        return tissue_model(
            self.width, self.height, self.mpp, self.seed, len(self.region_names) - 1, self.label_um
        )

    def region_at(self, x_px: np.ndarray | float, y_px: np.ndarray | float) -> np.ndarray:
        """Region label (0 = background) at level-0 pixel positions."""
        return self.model.region_at(x_px, y_px)

    def tile_source(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-0 RGB pixels of a region, identical to what the pyramid was written from."""
        return self.model.render(x, y, w, h)


def make_slide(
    path: str | os.PathLike[str],
    *,
    width_um: float,
    height_um: float,
    mpp: float = 0.25,
    seed: int = 0,
    n_regions: int = 4,
    label_um: float = 16.0,
    tile: int = 256,
    quality: int = 90,
    workers: int = 2,
) -> SyntheticSlide:
    """Render and write a synthetic pyramidal H&E slide of the given size; return its truth."""
    width, height = round(width_um / mpp), round(height_um / mpp)
    model = tissue_model(width, height, float(mpp), int(seed), int(n_regions), float(label_um))
    description = (
        f"histmol synthetic slide; seed={seed}; mpp={mpp}; regions={','.join(model.region_names)}"
    )
    write_pyramidal_tiff(
        path, model.render, width, height, mpp=mpp, tile=tile, quality=quality,
        description=description, workers=workers,
    )
    return SyntheticSlide(
        path=Path(path), mpp=float(mpp), width=width, height=height, labels=model.labels.copy(),
        label_um=float(label_um), region_names=model.region_names, seed=int(seed),
    )
