"""Synthetic Vizgen MERSCOPE region folders over a synthetic slide.

Why: the MERSCOPE adapter must be tested on the exact files a MERSCOPE run (or the Vizgen
post-processing tool) writes, with a known answer. Cells sit on tissue, each cell's molecules
within 4 um of its centre; background molecules (cell_id -1) and Blank-* barcodes are spread
everywhere. Entity ids are the 38-digit integers MERSCOPE writes, which overflow int64: a reader
that parses them as numbers loses them.

Files in `<out_dir>/<sample>/` (Vizgen post-processing tool, "Output data formats"):
`cell_by_gene.csv` (cell, genes..., Blank-<n>...), `cell_metadata.csv` (unnamed EntityID
column, fov, volume, center_x, center_y, min_x, max_x, min_y, max_y in um),
`detected_transcripts.csv` (unnamed per-FOV index, barcode_id, global_x, global_y, global_z, x,
y, fov, gene, transcript_id, cell_id), `cell_boundaries.parquet` (EntityID, ZIndex, Type,
Geometry as WKB) and `images/micron_to_mosaic_pixel_transform.csv` (0.108 um mosaic pixels).
Beside the bundle: `native_to_wsi.csv` (um -> slide px) and `landmarks.csv`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.synth._frames import (
    as_written,
    landmark_points,
    placement,
    to_native,
    to_slide,
    write_landmarks,
)
from histmol.synth.expression import (
    GroundTruth,
    circle_area_um2,
    gene_panel,
    region_profiles,
    simulate_counts,
)
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.visium import write_transform_csv

MOSAIC_UM_PER_PX = 0.108
FOV_UM = 221.184  # 2048 camera px of 0.108 um
ORIGIN_UM = (5400.0, 3100.0)  # where the region starts in the instrument's stage frame
CELL_UM = 10.0
CELL_PITCH_UM = 13.0
SPREAD_UM = 4.0
BACKGROUND_PER_UM2 = 0.004
MARGIN_UM = 12.0
Z_PLANES = 7


def write_merscope_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    seed: int = 0,
    n_genes: int = 40,
    n_blank: int = 5,
    rotation_deg: float = 8.0,
    landmark_noise_px: float = 1.0,
    sample: str = "region_0",
) -> GroundTruth:
    """Write a MERSCOPE region for `slide` and return the cells it encodes.

    `GroundTruth` units are the cell_by_gene rows; `counts` cover genes then Blank barcodes
    (`genes["feature_type"]` tells them apart). `extra["transcripts"]` holds every written
    transcript (x_um, y_um as parsed back, gene) for binned checks.
    """
    out_dir = Path(out_dir)
    bundle = out_dir / sample
    (bundle / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 37])
    w_um, h_um = slide.width * slide.mpp, slide.height * slide.mpp
    centre = (ORIGIN_UM[0] + w_um / 2.0, ORIGIN_UM[1] + h_um / 2.0)
    matrix = placement(slide, centre, rotation_deg)

    step, margin = CELL_PITCH_UM / slide.mpp, MARGIN_UM / slide.mpp
    cx, cy = np.meshgrid(
        np.arange(margin, slide.width - margin, step),
        np.arange(margin, slide.height - margin, step),
    )
    cx = cx.ravel() + rng.uniform(-0.25, 0.25, cx.size) * step
    cy = cy.ravel() + rng.uniform(-0.25, 0.25, cy.size) * step
    on = slide.region_at(cx, cy) > 0
    x, y = to_native(matrix, cx[on], cy[on])
    _, x = as_written(x, 6)
    _, y = as_written(y, 6)
    ids = _entity_ids(rng, len(x))
    genes = gene_panel(n_genes, n_controls=n_blank)
    blanks = [f"Blank-{i}" for i in range(n_blank)]
    genes.loc[n_genes:, "gene_id"] = blanks
    genes.loc[n_genes:, "symbol"] = blanks
    r_px = 0.6 * CELL_UM / 2.0 / slide.mpp
    angles = np.arange(6) * np.pi / 3.0
    sx, sy = to_slide(matrix, x, y)
    samples = slide.region_at(
        sx[:, None] + np.concatenate([[0.0], r_px * np.cos(angles)]),
        sy[:, None] + np.concatenate([[0.0], r_px * np.sin(angles)]),
    )
    counts = simulate_counts(
        samples,
        n_genes=n_genes,
        unit_area_um2=circle_area_um2(CELL_UM),
        seed=seed,
        genes=genes,
        region_names=slide.region_names,
    )

    tx = _molecules(rng, counts, x, y, ids, slide, matrix, genes)
    symbols = genes["symbol"].tolist()
    by_gene = pd.DataFrame(counts.toarray(), columns=symbols)
    by_gene.insert(0, "cell", ids)
    by_gene.to_csv(bundle / "cell_by_gene.csv", index=False)
    half = CELL_UM / 2.0
    meta = pd.DataFrame(
        {
            "": ids,
            "fov": _fov(x, y),
            "volume": np.round(circle_area_um2(CELL_UM) * 1.5 * Z_PLANES, 6),
            "center_x": [f"{v:.6f}" for v in x],
            "center_y": [f"{v:.6f}" for v in y],
            "min_x": np.round(x - half, 6),
            "max_x": np.round(x + half, 6),
            "min_y": np.round(y - half, 6),
            "max_y": np.round(y + half, 6),
        }
    )
    meta.to_csv(bundle / "cell_metadata.csv", index=False)
    written = _write_transcripts(bundle / "detected_transcripts.csv", tx, genes, ids)
    _write_boundaries(bundle / "cell_boundaries.parquet", ids, x, y)
    mosaic = np.array(
        [
            [1 / MOSAIC_UM_PER_PX, 0.0, -ORIGIN_UM[0] / MOSAIC_UM_PER_PX],
            [0.0, 1 / MOSAIC_UM_PER_PX, -ORIGIN_UM[1] / MOSAIC_UM_PER_PX],
            [0.0, 0.0, 1.0],
        ]
    )
    np.savetxt(bundle / "images" / "micron_to_mosaic_pixel_transform.csv", mosaic, fmt="%.8f")

    transform_path = out_dir / "native_to_wsi.csv"
    write_transform_csv(transform_path, matrix)
    landmarks_path = write_landmarks(
        out_dir / "landmarks.csv",
        matrix,
        landmark_points(x, y),
        noise_px=landmark_noise_px,
        seed=seed,
    )
    return GroundTruth(
        platform="merscope",
        bundle=bundle,
        wsi_path=Path(slide.path),
        wsi_mpp=slide.mpp,
        native_to_wsi=matrix,
        unit_ids=np.asarray(ids, dtype=object),
        x_native=x,
        y_native=y,
        x_wsi_px=sx,
        y_wsi_px=sy,
        x_slide_px=sx,
        y_slide_px=sy,
        region=samples[:, 0].astype(np.int64),
        in_tissue=(samples > 0).any(axis=1),
        counts=counts,
        genes=genes,
        unit_size_um=CELL_UM,
        transform_path=transform_path,
        region_names=slide.region_names,
        extra={
            "transcripts": written,
            "landmarks_path": landmarks_path,
            "micron_to_mosaic": mosaic,
            "n_background": int((tx["cell"] < 0).sum()),
        },
    )


def _entity_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Draw unique 38-digit entity ids, as MERSCOPE writes them (beyond int64)."""
    ids: set[str] = set()
    while len(ids) < n:
        ids.update("".join(map(str, rng.integers(0, 10, 37))) for _ in range(n - len(ids)))
    return ["1" + i for i in sorted(ids)][:n]


def _fov(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """FOV index of points: a grid of FOV_UM tiles from the region origin, row-major."""
    col = np.floor((x - ORIGIN_UM[0] + 2 * FOV_UM) / FOV_UM).astype(np.int64)
    row = np.floor((y - ORIGIN_UM[1] + 2 * FOV_UM) / FOV_UM).astype(np.int64)
    return row * 100 + col


def _molecules(
    rng: np.random.Generator,
    counts: sp.csr_matrix,
    x: np.ndarray,
    y: np.ndarray,
    ids: list[str],
    slide: SyntheticSlide,
    matrix: np.ndarray,
    genes: pd.DataFrame,
) -> pd.DataFrame:
    """Place the cells' molecules (within SPREAD_UM of their centre) and background ones."""
    coo = sp.coo_matrix(counts)
    cell = np.repeat(coo.row, coo.data)
    gene = np.repeat(coo.col, coo.data)
    radius = SPREAD_UM * np.sqrt(rng.random(cell.size))
    angle = rng.uniform(0, 2 * np.pi, cell.size)
    margin = MARGIN_UM / slide.mpp
    area_um2 = (slide.width - 2 * margin) * (slide.height - 2 * margin) * slide.mpp**2
    n = rng.poisson(BACKGROUND_PER_UM2 * area_um2)
    bx, by = to_native(
        matrix,
        rng.uniform(margin, slide.width - margin, n),
        rng.uniform(margin, slide.height - margin, n),
    )
    profile = region_profiles(genes, slide.region_names)[0]
    return pd.DataFrame(
        {
            "x": np.concatenate([x[cell] + radius * np.cos(angle), bx]),
            "y": np.concatenate([y[cell] + radius * np.sin(angle), by]),
            "gene": np.concatenate([gene, rng.choice(len(genes), n, p=profile)]),
            "cell": np.concatenate([cell, np.full(n, -1)]),
            "z": rng.integers(0, Z_PLANES, cell.size + n),
        }
    )


def _write_transcripts(
    path: Path, tx: pd.DataFrame, genes: pd.DataFrame, ids: list[str]
) -> pd.DataFrame:
    """detected_transcripts.csv sorted by FOV; returns (x_um, y_um, gene) as parsed back."""
    fov = _fov(tx["x"].to_numpy(), tx["y"].to_numpy())
    order = np.argsort(fov, kind="stable")
    tx, fov = tx.iloc[order].reset_index(drop=True), fov[order]
    gx_text, gx = as_written(tx["x"].to_numpy(), 4)
    gy_text, gy = as_written(tx["y"].to_numpy(), 4)
    col, row = fov % 100, fov // 100
    fov_x0 = ORIGIN_UM[0] + (col - 2) * FOV_UM
    fov_y0 = ORIGIN_UM[1] + (row - 2) * FOV_UM
    index = pd.Series(np.arange(len(tx))).groupby(fov).cumcount().to_numpy()
    names = genes["symbol"].to_numpy()
    table = pd.DataFrame(
        {
            "": index,
            "barcode_id": tx["gene"].to_numpy(),
            "global_x": gx_text,
            "global_y": gy_text,
            "global_z": tx["z"].astype(float).to_numpy(),
            "x": np.round((gx - fov_x0) / MOSAIC_UM_PER_PX, 2),
            "y": np.round((gy - fov_y0) / MOSAIC_UM_PER_PX, 2),
            "fov": fov,
            "gene": names[tx["gene"].to_numpy()],
            "transcript_id": [f"ENST{g:011d}" for g in tx["gene"].to_numpy()],
            "cell_id": np.where(tx["cell"] >= 0, np.asarray(ids, dtype=object)[tx["cell"]], "-1"),
        }
    )
    table.to_csv(path, index=False)
    return pd.DataFrame({"x_um": gx, "y_um": gy, "gene": table["gene"].to_numpy()})


def _write_boundaries(path: Path, ids: list[str], x: np.ndarray, y: np.ndarray) -> None:
    """cell_boundaries.parquet: one hexagonal MultiPolygon (WKB) per cell on z plane 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    angles = np.arange(7) * np.pi / 3.0
    rings = np.stack(
        [x[:, None] + CELL_UM / 2 * np.cos(angles), y[:, None] + CELL_UM / 2 * np.sin(angles)],
        axis=-1,
    )
    geometry = shapely.multipolygons([[shapely.polygons(r)] for r in rings])
    table = pa.table(
        {
            "ID": np.arange(len(ids)),
            "EntityID": ids,
            "ZIndex": np.zeros(len(ids), np.int64),
            "Type": ["cell"] * len(ids),
            "Geometry": shapely.to_wkb(geometry),
        }
    )
    pq.write_table(table, path)
