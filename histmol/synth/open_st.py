"""Synthetic Open-ST bundles: one aligned spacemake/openst h5ad over a synthetic slide.

Why: the Open-ST adapter must be tested on the h5ad `openst pairwise_aligner --save-image-in-h5`
writes (rajewsky-lab/openst, `openst/alignment/pairwise_aligner.py`), with a known answer:
`X` (spots x genes, raw counts stored as float32 as spacemake does), `var` indexed by gene name,
`obs` with `tile_id`, `puck_id`, `total_counts`, `obsm/spatial` (puck micrometres),
`obsm/spatial_pairwise_aligned_coarse` and `_fine` (aligned image pixels as (row, col)) and
`uns/spatial_pairwise_aligned/{staining_image, staining_image_transformed}`.

Capture spots sit at random positions (only spots that captured something are kept, as in a
spacemake DGE), split into flow-cell tiles. The aligned image is the slide's level 0 (the
aligner's best flip being none), so the fine positions are slide pixels; the coarse ones are off
by a few pixels, as a coarse alignment is. Keep slides small: the image is stored in the h5ad.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tifffile

from histmol.synth.expression import GroundTruth, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.seq_scope import random_barcodes, random_points
from histmol.synth.visium import write_transform_csv

PUCK_ORIGIN_UM = (1520.0, 880.0)  # the section's offset in the stitched puck collection
TILE_UM = 250.0  # tiles split the capture area (NovaSeq S4 tiles are ~1 mm; kept small here)
COARSE_OFFSET_PX = (2.5, -1.5)


def write_open_st_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    density_per_um2: float = 0.05,
    seed: int = 0,
    n_genes: int = 200,
    margin_um: float = 20.0,
    sample: str = "openst_synthetic",
) -> GroundTruth:
    """Write `<out_dir>/<sample>_stitched_spots_aligned.h5ad` and return what it encodes.

    Units of the truth are the spots (h5ad rows): `x_native`/`y_native` are their aligned
    column/row in image pixels (= slide level-0 px) and `counts` their raw counts.
    """
    import anndata  # here, not at module level: it costs ~1.5 s to import

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 83])
    px, py = random_points(slide, density_per_um2, margin_um, rng)
    labels = slide.region_at(px, py)
    genes = gene_panel(n_genes)
    counts = simulate_counts(
        labels,
        n_genes=n_genes,
        unit_area_um2=1.0 / density_per_um2,
        seed=seed,
        genes=genes,
        region_names=slide.region_names,
    )
    keep = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() > 0)
    counts = sp.csr_matrix(counts[keep], dtype=np.int32)
    px, py, labels = px[keep], py[keep], labels[keep]
    um_x = px * slide.mpp + PUCK_ORIGIN_UM[0]
    um_y = py * slide.mpp + PUCK_ORIGIN_UM[1]
    tiles = np.array(
        [
            f"fc_1_L3_tile_{2300 + int(a) + 10 * int(b)}"
            for a, b in zip(um_x // TILE_UM, um_y // TILE_UM, strict=True)
        ],
        dtype=object,
    )
    barcodes = random_barcodes(len(keep), 25, rng)
    order = rng.permutation(len(keep))  # spacemake does not sort spots by position
    counts, px, py, labels, um_x, um_y, tiles = (
        counts[order],
        px[order],
        py[order],
        labels[order],
        um_x[order],
        um_y[order],
        tiles[order],
    )
    barcodes = barcodes[order]

    obs = pd.DataFrame(
        {
            "tile_id": pd.Categorical(tiles),
            "puck_id": pd.Categorical(tiles),
            "total_counts": np.asarray(counts.sum(axis=1)).ravel().astype(np.float32),
            "n_genes_by_counts": np.diff(counts.indptr).astype(np.int32),
        },
        index=pd.Index(barcodes.astype(str), name="cell_bc"),
    )
    var = pd.DataFrame(index=pd.Index(genes["symbol"].astype(str).to_numpy(), name="gene_name"))
    adata = anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = np.column_stack([um_x, um_y])
    fine = np.column_stack([py, px])
    adata.obsm["spatial_pairwise_aligned_fine"] = fine
    adata.obsm["spatial_pairwise_aligned_coarse"] = fine + np.array(COARSE_OFFSET_PX)[::-1]
    with tifffile.TiffFile(slide.path) as tif:
        image = tif.pages[0].asarray()
    adata.uns["spatial_pairwise_aligned"] = {
        "staining_image": image,
        "staining_image_transformed": image,
    }
    path = out_dir / f"{sample}_stitched_spots_aligned.h5ad"
    adata.write_h5ad(path, compression="gzip")
    transform_path = out_dir / "native_to_wsi.csv"
    identity = np.eye(3)
    write_transform_csv(transform_path, identity)
    return GroundTruth(
        platform="open-st",
        bundle=out_dir,
        wsi_path=Path(slide.path),
        wsi_mpp=slide.mpp,
        native_to_wsi=identity,
        unit_ids=barcodes,
        x_native=px,
        y_native=py,
        x_wsi_px=px,
        y_wsi_px=py,
        x_slide_px=px,
        y_slide_px=py,
        region=labels.astype(np.int64),
        in_tissue=labels > 0,
        counts=counts,
        genes=genes,
        unit_size_um=0.6,
        transform_path=transform_path,
        region_names=slide.region_names,
        extra={"h5ad": path, "density_per_um2": density_per_um2, "tiles": tiles},
    )
