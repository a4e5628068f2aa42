"""Synthetic legacy Spatial Transcriptomics (ST, Stahl et al. 2016) bundles.

Why: legacy ST is the oldest platform in public corpora (HER2ST, cSCC, MOB) and its files are
the least uniform: a plain JPEG of the H&E, st_pipeline's counts table and, when spots were
aligned, the ST spot detector's selection table. The array (33 x 35 spots, 100 um spots, 200 um
pitch, 1-based `XxY` ids) sits a few degrees rotated on the image, so the ground truth maps array
coordinates to JPEG pixels through a rotation.

Files (in `<out_dir>/`, names as in HER2ST / st_pipeline outputs):
`<sample>_stdata.tsv` (spots x genes; first column the `XxY` id, header cell empty),
`<sample>_selection.tsv` (spot detector: x, y, new_x, new_y, pixel_x, pixel_y, selected;
pixel coordinates in the JPEG), `<sample>.jpg` (the H&E, cropped from the slide around the array).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from histmol.synth.expression import GroundTruth, circle_area_um2, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.visium import write_transform_csv

N_X, N_Y = 33, 35  # array x (columns) 1..33, y (rows) 1..35
PITCH_UM = 200.0
SPOT_UM = 100.0
MARGIN_UM = 300.0  # image margin around the array
JITTER = 0.02  # spot-detector offsets of real spots from the nominal grid, in array units


def _render_crop(slide: SyntheticSlide, x0: int, y0: int, w: int, h: int, factor: int,
                 workers: int = 2) -> np.ndarray:
    """Box-downsample (by `factor`) the level-0 rendering of a slide region, strips in threads."""
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, 512 // factor)

    def strip(r0: int) -> None:
        rh = min(rows, h - r0)
        block = slide.tile_source(x0, y0 + r0 * factor, w * factor, rh * factor)
        sums = block.reshape(rh, factor, w, factor, 3).sum(axis=(1, 3), dtype=np.uint32)
        out[r0 : r0 + rh] = ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(strip, range(0, h, rows)))
    return out


def write_st_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    positions: Literal["selection", "none"] = "selection",
    seed: int = 0,
    n_genes: int = 200,
    image_format: Literal["jpg"] = "jpg",
    image_mpp: float | None = None,
    rotation_deg: float = 2.5,
    sample: str = "synthetic_st",
) -> GroundTruth:
    """Write a legacy ST bundle for `slide` and return what it encodes.

    The JPEG is the slide cropped around the array and box-downsampled by an integer factor to
    `image_mpp` (default about 1 um/px); it is the section's image, so `x_wsi_px`/`y_wsi_px` are
    JPEG pixels and `native_to_wsi` maps array coordinates (x, y) to them. With a selection
    table, spots sit slightly off the nominal grid (`new_x`, `new_y`, the native coordinates
    here) and `pixel_x`/`pixel_y` hold the JPEG positions rounded to 0.01 px, as the spot
    detector writes them; with `positions="none"` only the `XxY` ids place spots (nominal grid).
    `<out_dir>/native_to_wsi.csv` holds the array -> JPEG transform.
    """
    if positions not in ("selection", "none"):
        raise ValueError(f"positions must be 'selection' or 'none', got {positions!r}")
    if image_format != "jpg":
        raise ValueError(f"image_format must be 'jpg' (legacy ST uses JPEGs), got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    factor = max(1, round((image_mpp or 1.0) / slide.mpp))
    jpeg_mpp = slide.mpp * factor

    # Array -> slide level-0 px: centred on the slide, rotated.
    theta = np.deg2rad(rotation_deg)
    p = PITCH_UM / slide.mpp
    cx, cy = slide.width / 2.0, slide.height / 2.0
    xc, yc = (N_X + 1) / 2.0, (N_Y + 1) / 2.0
    to_slide = np.array([
        [p * np.cos(theta), -p * np.sin(theta), cx - p * (np.cos(theta) * xc - np.sin(theta) * yc)],
        [p * np.sin(theta), p * np.cos(theta), cy - p * (np.sin(theta) * xc + np.cos(theta) * yc)],
        [0.0, 0.0, 1.0],
    ])
    gx, gy = np.meshgrid(np.arange(1, N_X + 1), np.arange(1, N_Y + 1))
    ax, ay = gx.ravel().astype(np.float64), gy.ravel().astype(np.float64)
    sx, sy = (to_slide @ np.stack([ax, ay, np.ones_like(ax)]))[:2]
    r = SPOT_UM / 2.0 / slide.mpp
    margin = MARGIN_UM / slide.mpp
    x0 = int(max(0.0, (sx - r - margin).min()) // factor * factor)
    y0 = int(max(0.0, (sy - r - margin).min()) // factor * factor)
    w = int(min(slide.width, (sx + r + margin).max()) - x0) // factor
    h = int(min(slide.height, (sy + r + margin).max()) - y0) // factor
    # Array -> JPEG px.
    to_jpeg = np.diag([1.0 / factor, 1.0 / factor, 1.0]) @ (
        np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]]) @ to_slide
    )

    rng = np.random.default_rng([int(seed), 31])
    if positions == "selection":
        jitter = rng.normal(0.0, JITTER, (2, ax.size))
        nx = np.array([float(f"{v:.2f}") for v in ax + jitter[0]])
        ny = np.array([float(f"{v:.2f}") for v in ay + jitter[1]])
    else:
        nx, ny = ax.copy(), ay.copy()
    jx, jy = (to_jpeg @ np.stack([nx, ny, np.ones_like(nx)]))[:2]
    rj = r / factor
    fits = (jx - rj >= 0) & (jy - rj >= 0) & (jx + rj <= w) & (jy + rj <= h)
    ax, ay, nx, ny, jx, jy = ax[fits], ay[fits], nx[fits], ny[fits], jx[fits], jy[fits]
    slide_x, slide_y = x0 + jx * factor, y0 + jy * factor
    ring = 0.6 * r * np.exp(1j * np.arange(6) * np.pi / 3.0)
    ox, oy = np.concatenate([[0.0], ring.real]), np.concatenate([[0.0], ring.imag])
    samples = slide.region_at(slide_x[:, None] + ox, slide_y[:, None] + oy)
    under_tissue = (samples > 0).any(axis=1)

    genes = gene_panel(n_genes)
    counts = simulate_counts(
        samples, n_genes=n_genes, unit_area_um2=circle_area_um2(SPOT_UM), seed=seed,
        genes=genes, region_names=slide.region_names,
    )
    # st_pipeline only reports spots that captured something
    keep = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() > 0)
    counts = counts[keep]
    ids = np.array([f"{int(a)}x{int(b)}" for a, b in zip(ax, ay, strict=True)], dtype=object)

    table = pd.DataFrame(counts.toarray(), columns=genes["gene_id"].to_numpy())
    table.insert(0, "", ids[keep])
    table.to_csv(out_dir / f"{sample}_stdata.tsv", sep="\t", index=False)
    if positions == "selection":
        selection = pd.DataFrame({
            "x": ax.astype(np.int64), "y": ay.astype(np.int64),
            "new_x": [f"{v:.2f}" for v in nx], "new_y": [f"{v:.2f}" for v in ny],
            "pixel_x": [f"{v:.2f}" for v in jx], "pixel_y": [f"{v:.2f}" for v in jy],
            "selected": under_tissue.astype(np.int64),
        })
        selection.to_csv(out_dir / f"{sample}_selection.tsv", sep="\t", index=False)
    buf = io.BytesIO()
    Image.fromarray(_render_crop(slide, x0, y0, w, h, factor)).save(buf, format="JPEG", quality=90)
    image_path = out_dir / f"{sample}.jpg"
    image_path.write_bytes(buf.getvalue())
    transform_path = out_dir / "native_to_wsi.csv"
    write_transform_csv(transform_path, to_jpeg)

    return GroundTruth(
        platform="st", bundle=out_dir, wsi_path=image_path, wsi_mpp=jpeg_mpp,
        native_to_wsi=to_jpeg, unit_ids=ids[keep], x_native=nx[keep], y_native=ny[keep],
        x_wsi_px=jx[keep], y_wsi_px=jy[keep], x_slide_px=slide_x[keep], y_slide_px=slide_y[keep],
        region=samples[keep, 0].astype(np.int64), in_tissue=under_tissue[keep], counts=counts,
        genes=genes, unit_size_um=SPOT_UM, transform_path=transform_path,
        region_names=slide.region_names,
        extra={"positions": positions, "crop_origin_slide_px": (x0, y0), "downsample": factor,
               "image_size": (w, h), "rotation_deg": rotation_deg},
    )
