"""Synthetic HDST (Vickovic et al. 2019) bundles in the layout of the SCP420 processed files.

Why: the HDST adapter must be tested on the files the study published, with a known answer.
Files, per broadinstitute/hdst `README.md` ("File Structure Overview"), in `<out_dir>/`:
`<sample>_HDST_red_ut.tsv.gz` (long counts: bc, spot_px_x, spot_px_y, gene, count) and
`<sample>_barcodes_under_tissue_annot.tsv` (bc, spot_px_x, spot_px_y, annotation_region).

Beads sit on the staggered grid of the study's `alignment/` code: bead (X, Y) (labels from 1)
lies at ((X - 1 + 0.25 + 0.5 * ((Y - 1) % 2)) * sx, (Y - 1 + 0.5) * sy) in the array frame,
rotated by a small angle, shifted, and rounded to whole H&E pixels. The H&E is the slide
itself, so `spot_px_*` are slide level-0 pixels and the truth transform is the identity. The
bead pitch here (`pitch_um`) is a synthetic choice: the study states 2 um beads, not a pitch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.synth.expression import GroundTruth, circle_area_um2, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.seq_scope import write_text_gz
from histmol.synth.visium import write_transform_csv

BEAD_UM = 2.0


def bead_grid(
    slide: SyntheticSlide, pitch_um: float, rotation_deg: float, margin_um: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bead labels (X, Y from 1) and their rounded pixel positions, inside a slide margin."""
    sx = pitch_um / slide.mpp
    sy = sx * np.sqrt(3.0) / 2.0
    n_x = int((slide.width - 2 * margin_um / slide.mpp) // sx)
    n_y = int((slide.height - 2 * margin_um / slide.mpp) // sy)
    gy, gx = np.meshgrid(np.arange(n_y), np.arange(n_x), indexing="ij")
    gx, gy = gx.ravel(), gy.ravel()
    ax = (gx + 0.25 + 0.5 * (gy % 2)) * sx - n_x * sx / 2.0
    ay = (gy + 0.5) * sy - n_y * sy / 2.0
    theta = np.deg2rad(rotation_deg)
    px = np.cos(theta) * ax - np.sin(theta) * ay + slide.width / 2.0
    py = np.sin(theta) * ax + np.cos(theta) * ay + slide.height / 2.0
    return gx + 1, gy + 1, np.round(px), np.round(py)


def write_hdst_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    seed: int = 0,
    n_genes: int = 200,
    pitch_um: float = 2.5,
    rotation_deg: float = 0.4,
    margin_um: float = 30.0,
    sample: str = "CN_synthetic_D1",
) -> GroundTruth:
    """Write an HDST bundle for `slide` and return what it encodes.

    Units of the truth are the beads under tissue with at least one count (the beads of the
    counts table); `x_native`/`y_native` are their `spot_px_x`/`spot_px_y`. The positions table
    lists every bead under tissue, counted or not.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bx, by, px, py = bead_grid(slide, pitch_um, rotation_deg, margin_um)
    labels = slide.region_at(px, py)
    under = labels > 0
    bx, by, px, py, labels = bx[under], by[under], px[under], py[under], labels[under]
    pairs = zip(bx.tolist(), by.tolist(), strict=True)
    ids = np.array([f"{x}x{y}" for x, y in pairs], dtype=object)
    region_names = np.asarray(slide.region_names, dtype=object)
    pd.DataFrame(
        {
            "bc": ids,
            "spot_px_x": px.astype(np.int64),
            "spot_px_y": py.astype(np.int64),
            "annotation_region": region_names[labels],
        }
    ).to_csv(out_dir / f"{sample}_barcodes_under_tissue_annot.tsv", sep="\t", index=False)

    genes = gene_panel(n_genes)
    counts = simulate_counts(
        labels,
        n_genes=n_genes,
        unit_area_um2=circle_area_um2(BEAD_UM),
        seed=seed,
        genes=genes,
        region_names=slide.region_names,
    )
    counted = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() > 0)
    counts = sp.csr_matrix(counts[counted], dtype=np.int32)
    coo = counts.tocoo()  # row-major: sorted by bead, then gene
    symbols = genes["symbol"].to_numpy(object)
    rows = counted[coo.row]
    table = pd.DataFrame(
        {
            "bc": ids[rows],
            "spot_px_x": px[rows].astype(np.int64),
            "spot_px_y": py[rows].astype(np.int64),
            "gene": symbols[coo.col],
            "count": coo.data,
        }
    )
    write_text_gz(out_dir / f"{sample}_HDST_red_ut.tsv.gz", table.to_csv(sep="\t", index=False))
    transform_path = out_dir / "native_to_wsi.csv"
    identity = np.eye(3)
    write_transform_csv(transform_path, identity)
    x, y = px[counted], py[counted]
    return GroundTruth(
        platform="hdst",
        bundle=out_dir,
        wsi_path=Path(slide.path),
        wsi_mpp=slide.mpp,
        native_to_wsi=identity,
        unit_ids=ids[counted],
        x_native=x,
        y_native=y,
        x_wsi_px=x,
        y_wsi_px=y,
        x_slide_px=x,
        y_slide_px=y,
        region=labels[counted].astype(np.int64),
        in_tissue=np.ones(len(counted), bool),
        counts=counts,
        genes=genes,
        unit_size_um=BEAD_UM,
        transform_path=transform_path,
        region_names=slide.region_names,
        extra={
            "pitch_um": pitch_um,
            "n_beads_under_tissue": len(ids),
            "rotation_deg": rotation_deg,
        },
    )
