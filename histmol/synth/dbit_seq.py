"""Synthetic DBiT-seq bundles (Liu et al. 2020) over a synthetic slide.

Why: the DBiT-seq adapter must be tested on the files the published DBiT-seq scripts produce,
with a known answer. The chip is n x n square pixels of `channel_um`, pitch 2 x `channel_um`,
centred on the slide and slightly rotated; pixel `AxB` (A the column, B the row, from 1 at the
top-left, as `Pixel_identification.m` and `1-position-matrix.pl` lay them out) maps to slide px
through the ground-truth transform. Files in `<out_dir>/`:

- `layout="st_pipeline"`: `<sample>_stdata.tsv`, the ST Pipeline matrix (pixels as rows named
  `AxB`, Ensembl ids as columns, empty corner cell), every pixel that captured something;
- `layout="h5ad"`: `<sample>.h5ad` (obs names = barcode B + barcode A, 16 nt, as the DBiT-seq
  `reformat.pl` writes; var = symbols with `gene_ids`) and `barcode_list.txt` (`A1<TAB>barcode`,
  the layout scverse/spatialdata-io reads);
- `position.txt`: the on-tissue pixels as `Pixel_identification.m` writes them (",AxB,AxB...");
- `corners.csv`: `spot,x,y`, the four corner pixels' centres in slide level-0 px;
- `native_to_wsi.csv` beside them: the (A, B) -> slide px transform.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.registration import apply_affine
from histmol.synth.expression import GroundTruth, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.seq_scope import random_barcodes
from histmol.synth.visium import write_transform_csv

SAMPLE_OFFSETS = np.linspace(-0.35, 0.35, 3)  # 3 x 3 samples inside each pixel, in widths


def chip_to_slide(
    slide: SyntheticSlide, n_channels: int, channel_um: float, rotation_deg: float
) -> np.ndarray:
    """Map (A, B) index -> slide px: the chip centred on the slide, rotated by `rotation_deg`."""
    pitch_px = 2.0 * channel_um / slide.mpp
    theta = np.deg2rad(rotation_deg)
    linear = pitch_px * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = np.full(2, (n_channels + 1) / 2.0)
    shift = np.array([slide.width / 2.0, slide.height / 2.0]) - linear @ centre
    return np.array([[*linear[0], shift[0]], [*linear[1], shift[1]], [0.0, 0.0, 1.0]])


def write_dbit_seq_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    layout: Literal["st_pipeline", "h5ad"] = "st_pipeline",
    n_channels: int = 50,
    channel_um: float = 10.0,
    seed: int = 0,
    n_genes: int = 200,
    rotation_deg: float = 1.2,
    sample: str = "dbit_synthetic",
) -> GroundTruth:
    """Write a DBiT-seq bundle for `slide` and return what it encodes.

    Units of the truth are the pixels of the count matrix (every pixel with a count);
    `in_tissue` marks those `position.txt` lists (a tissue label at any of 9 samples inside the
    pixel). The whole chip must lie on the slide.
    """
    import anndata  # here, not at module level: it costs ~1.5 s to import

    if layout not in ("st_pipeline", "h5ad"):
        raise ValueError(f"layout must be 'st_pipeline' or 'h5ad', got {layout!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = chip_to_slide(slide, n_channels, channel_um, rotation_deg)
    b, a = np.meshgrid(np.arange(1, n_channels + 1), np.arange(1, n_channels + 1), indexing="ij")
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)  # row-major: B then A
    sx, sy = apply_affine(m, a, b)
    half = channel_um / slide.mpp / 2.0
    if (
        (sx - half).min() < 0
        or (sy - half).min() < 0
        or (sx + half).max() > slide.width
        or (sy + half).max() > slide.height
    ):
        raise ValueError("the chip does not fit on the slide; use a larger slide")
    ox, oy = np.meshgrid(SAMPLE_OFFSETS, SAMPLE_OFFSETS)
    da, db = ox.ravel() / 2.0, oy.ravel() / 2.0  # widths -> index units (pitch = 2 widths)
    samples = slide.region_at(*apply_affine(m, a[:, None] + da, b[:, None] + db))
    on_tissue = (samples > 0).any(axis=1)
    genes = gene_panel(n_genes)
    counts = simulate_counts(
        samples,
        n_genes=n_genes,
        unit_area_um2=channel_um**2,
        seed=seed,
        genes=genes,
        region_names=slide.region_names,
    )
    keep = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() > 0)
    counts = sp.csr_matrix(counts[keep], dtype=np.int32)
    pairs = list(zip(a[keep].astype(int), b[keep].astype(int), strict=True))
    ids = np.array([f"{x}x{y}" for x, y in pairs], dtype=object)
    rng = np.random.default_rng([int(seed), 97])
    if layout == "st_pipeline":
        table = pd.DataFrame(counts.toarray(), columns=genes["gene_id"].to_numpy())
        table.insert(0, "", ids)
        table.to_csv(out_dir / f"{sample}_stdata.tsv", sep="\t", index=False)
    else:
        codes = random_barcodes(2 * n_channels, 8, rng)[rng.permutation(2 * n_channels)]
        bar_a, bar_b = codes[:n_channels], codes[n_channels:]
        labels = [f"A{i}" for i in range(1, n_channels + 1)] + [
            f"B{i}" for i in range(1, n_channels + 1)
        ]
        pd.DataFrame({"label": labels, "barcode": np.concatenate([bar_a, bar_b])}).to_csv(
            out_dir / "barcode_list.txt", sep="\t", header=False, index=False
        )
        names = [bar_b[y - 1] + bar_a[x - 1] for x, y in pairs]
        var = pd.DataFrame(
            {"gene_ids": genes["gene_id"].to_numpy()},
            index=pd.Index(genes["symbol"].astype(str).to_numpy()),
        )
        adata = anndata.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame(index=names), var=var)
        adata.write_h5ad(out_dir / f"{sample}.h5ad")
    listed = ids[on_tissue[keep]]
    (out_dir / "position.txt").write_text("".join(f",{t}" for t in listed))
    corner_a = np.array([1, n_channels, 1, n_channels], dtype=np.float64)
    corner_b = np.array([1, 1, n_channels, n_channels], dtype=np.float64)
    cx, cy = apply_affine(m, corner_a, corner_b)
    pd.DataFrame(
        {
            "spot": [f"{int(x)}x{int(y)}" for x, y in zip(corner_a, corner_b, strict=True)],
            "x": cx,
            "y": cy,
        }
    ).to_csv(out_dir / "corners.csv", index=False, float_format="%.17g")
    transform_path = out_dir / "native_to_wsi.csv"
    write_transform_csv(transform_path, m)
    return GroundTruth(
        platform="dbit-seq",
        bundle=out_dir,
        wsi_path=Path(slide.path),
        wsi_mpp=slide.mpp,
        native_to_wsi=m,
        unit_ids=ids,
        x_native=a[keep],
        y_native=b[keep],
        x_wsi_px=sx[keep],
        y_wsi_px=sy[keep],
        x_slide_px=sx[keep],
        y_slide_px=sy[keep],
        region=samples[keep, 4].astype(np.int64),
        in_tissue=on_tissue[keep],
        counts=counts,
        genes=genes,
        unit_size_um=channel_um,
        transform_path=transform_path,
        region_names=slide.region_names,
        extra={"layout": layout, "n_channels": n_channels, "rotation_deg": rotation_deg},
    )
