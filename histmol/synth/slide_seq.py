"""Synthetic Slide-seqV2 / Curio Seeker pucks over a synthetic slide.

Why: the Slide-seq adapter must be tested on the files the pipelines write, with a known answer,
and Slide-seq has what no array platform has: beads randomly packed (a jittered hexagonal
monolayer with gaps, not a lattice) and an H&E of an adjacent section, placed only by a rotation
+ translation fitted to landmarks. The slide stands in for that adjacent section.

Layouts (in `<out_dir>/<sample>/`):
- `spacexr`: `BeadLocationsForR.csv` (barcodes, xcoord, ycoord in puck pixels of 0.65 um) and
  `MappedDGEForR.csv` (genes x beads, R `write.csv` quoting), as dmcable/spacexr reads them.
- `curio`: `<sample>_anndata.h5ad` (X raw counts, beads x genes; obsm["spatial"] in um), as the
  Curio Seeker pipeline writes it (scverse/spatialdata-io `readers/curio.py`).
Beside the bundle: `native_to_wsi.csv` (um -> slide px) and `landmarks.csv`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from histmol.synth._frames import (
    as_written,
    landmark_points,
    placement,
    to_slide,
    write_landmarks,
)
from histmol.synth.expression import GroundTruth, circle_area_um2, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.visium import write_transform_csv

BEAD_UM = 10.0
PITCH_UM = 10.0  # hexagonal packing of touching beads
JITTER_UM = 1.5
VACANCY = 0.15  # beads lost in packing or not matched to a barcode
UM_PER_PIXEL = 0.65  # Slide-seq puck images: the unit of BeadLocationsForR.csv
MARGIN_UM = 20.0


def write_slide_seq_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    layout: Literal["spacexr", "curio"] = "spacexr",
    seed: int = 0,
    n_genes: int = 60,
    rotation_deg: float = 12.0,
    landmark_noise_px: float = 1.0,
    sample: str = "synthetic_puck",
) -> GroundTruth:
    """Write a puck covering the slide's largest inscribed disc and return what it encodes.

    Beads whose whole disc is on the slide and that captured at least one molecule are listed
    (pipelines drop empty beads). Native coordinates are um; `GroundTruth.x_native` is the value
    the adapter computes from the written text (0.65 um per pixel for `spacexr`).
    """
    if layout not in ("spacexr", "curio"):
        raise ValueError(f"layout must be 'spacexr' or 'curio', got {layout!r}")
    out_dir = Path(out_dir)
    bundle = out_dir / sample
    bundle.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 41])
    radius = min(slide.width, slide.height) * slide.mpp / 2.0 - MARGIN_UM - BEAD_UM
    centre = radius + 100.0  # the puck frame starts a little outside the puck, like real ones
    gx, gy = np.meshgrid(
        np.arange(-radius, radius + PITCH_UM, PITCH_UM),
        np.arange(-radius, radius + PITCH_UM, PITCH_UM * np.sqrt(3) / 2),
    )
    gx = gx + (np.round(gy / (PITCH_UM * np.sqrt(3) / 2)) % 2) * PITCH_UM / 2
    x, y = gx.ravel(), gy.ravel()
    x, y = x + rng.normal(0, JITTER_UM, x.size), y + rng.normal(0, JITTER_UM, y.size)
    keep = (np.hypot(x, y) <= radius) & (rng.random(x.size) >= VACANCY)
    x, y = x[keep] + centre, y[keep] + centre
    scale = UM_PER_PIXEL if layout == "spacexr" else 1.0
    x_text, x_read = as_written(x / scale, 4)
    y_text, y_read = as_written(y / scale, 4)
    x_um, y_um = x_read * scale, y_read * scale

    matrix = placement(slide, (centre, centre), rotation_deg)
    sx, sy = to_slide(matrix, x_um, y_um)
    r_px = 0.6 * BEAD_UM / 2.0 / slide.mpp
    angles = np.arange(6) * np.pi / 3.0
    ox = np.concatenate([[0.0], r_px * np.cos(angles)])
    oy = np.concatenate([[0.0], r_px * np.sin(angles)])
    samples = slide.region_at(sx[:, None] + ox, sy[:, None] + oy)
    genes = gene_panel(n_genes)
    counts = simulate_counts(
        samples,
        n_genes=n_genes,
        unit_area_um2=circle_area_um2(BEAD_UM),
        seed=seed,
        genes=genes,
        region_names=slide.region_names,
    )
    listed = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() > 0)
    counts = counts[listed]
    barcodes = _barcodes(rng, len(x))[listed]
    symbols = genes["symbol"].to_numpy(object)

    if layout == "spacexr":
        locations = pd.DataFrame(
            {
                "barcodes": barcodes,
                "xcoord": np.asarray(x_text, object)[listed],
                "ycoord": np.asarray(y_text, object)[listed],
            }
        )
        locations.to_csv(bundle / "BeadLocationsForR.csv", index=False)
        dge = pd.DataFrame(counts.T.toarray(), index=symbols, columns=barcodes)
        dge.to_csv(bundle / "MappedDGEForR.csv", quoting=2)  # R write.csv: quoted labels
    else:
        _write_curio(
            bundle / f"{sample}_anndata.h5ad",
            barcodes,
            symbols,
            counts,
            np.column_stack([x_um[listed], y_um[listed]]),
        )
    transform_path = out_dir / "native_to_wsi.csv"
    write_transform_csv(transform_path, matrix)
    landmarks_path = write_landmarks(
        out_dir / "landmarks.csv",
        matrix,
        landmark_points(x_um[listed], y_um[listed]),
        noise_px=landmark_noise_px,
        seed=seed,
    )
    return GroundTruth(
        platform="slide-seq",
        bundle=bundle,
        wsi_path=Path(slide.path),
        wsi_mpp=slide.mpp,
        native_to_wsi=matrix,
        unit_ids=barcodes.astype(object),
        x_native=x_um[listed],
        y_native=y_um[listed],
        x_wsi_px=sx[listed],
        y_wsi_px=sy[listed],
        x_slide_px=sx[listed],
        y_slide_px=sy[listed],
        region=samples[listed, 0].astype(np.int64),
        in_tissue=(samples[listed] > 0).any(axis=1),
        counts=counts,
        genes=genes,
        unit_size_um=BEAD_UM,
        transform_path=transform_path,
        region_names=slide.region_names,
        extra={
            "layout": layout,
            "um_per_coordinate": scale,
            "landmarks_path": landmarks_path,
            "puck_radius_um": radius,
            "n_beads_packed": len(x),
        },
    )


def _barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw unique 14-nt bead barcodes (the Slide-seqV2 bead barcode length)."""
    nt = np.array(list("ACGT"))
    while True:
        codes = np.array(["".join(nt[c]) for c in rng.integers(0, 4, (n, 14))], dtype=object)
        if len(set(codes)) == n:
            return codes


def _write_curio(
    path: Path, barcodes: np.ndarray, symbols: np.ndarray, counts, xy: np.ndarray
) -> None:
    """Curio Seeker's AnnData: raw counts in X, positions in obsm['spatial'] (and 'X_spatial')."""
    import anndata

    adata = anndata.AnnData(
        X=counts.astype(np.int32),
        obs=pd.DataFrame(index=pd.Index(barcodes.astype(str), name="barcode")),
        var=pd.DataFrame(index=pd.Index(symbols.astype(str), name="gene")),
    )
    adata.obsm["spatial"] = xy
    adata.obsm["X_spatial"] = xy.copy()
    adata.write_h5ad(path)
