"""Synthetic CosMx SMI flat-file bundles (legacy and AtoMx SIP 1.3.2) over a synthetic slide.

Why: the CosMx adapter must be tested on the exact flat files, with a known answer, and CosMx's
traps are in its frames: FOVs placed by `fov_positions_file.csv`, local pixel coordinates per
FOV, a global frame whose y axis points up, and two export layouts that disagree on the sign of
local y and on the pixel size. Two FOVs side by side cover the slide (the part of a FOV beyond
the slide is bare glass); cells sit on tissue, each cell's molecules within 4 um of its centre,
plus background molecules (cell_ID 0) everywhere on the covered slide.

Layouts (files `<out_dir>/<sample>/<sample>_*`, columns per NanoString's "Comparing AtoMx SIP
flat files with the legacy format"):
- `atomx`: 0.12028 um/px, 4256 x 4256 px FOVs; fov positions `FOV, x_global_px, y_global_px,
  x_global_mm, y_global_mm`; y_global = y_fov - y_local; Negative<n> and SystemControl<n>
  targets; no cell_ID 0 rows in exprMat; `<sample>-polygons.csv` cell outlines.
- `legacy`: 0.18 um/px (Dash), 5472 x 3648 px FOVs; fov positions `fov, x_global_px,
  y_global_px`; y_global = y_fov + y_local; NegPrb<n> targets; one cell_ID 0 (background) row
  per FOV in exprMat.
Beside the bundle: `native_to_wsi.csv` (adapter frame: um, y = -y_global * px -> slide px) and
`landmarks.csv`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

LAYOUTS: dict[str, dict[str, object]] = {
    "atomx": {
        "px_um": 0.12028,
        "fov_px": (4256, 4256),
        "y_sign": -1.0,
        "fov_column": "FOV",
        "origin_px": (0.0, 29791.0),
        "negative": "Negative",
        "n_system": 2,
    },
    "legacy": {
        "px_um": 0.18,
        "fov_px": (5472, 3648),
        "y_sign": 1.0,
        "fov_column": "fov",
        "origin_px": (3188.888889, 155216.666667),
        "negative": "NegPrb",
        "n_system": 0,
    },
}
CELL_UM = 9.0
CELL_PITCH_UM = 12.0
SPREAD_UM = 4.0  # molecules of a cell lie within this radius of its centre
BACKGROUND_PER_UM2 = 0.004
MARGIN_UM = 12.0
N_FOVS = 2
ATOMX_METADATA = [  # the AtoMx 1.3.2 order: cell_ID after the global centres
    "fov",
    "Area",
    "AspectRatio",
    "CenterX_local_px",
    "CenterY_local_px",
    "Width",
    "Height",
    "Mean.DAPI",
    "cell_id",
    "CenterX_global_px",
    "CenterY_global_px",
    "cell_ID",
]


@dataclass(frozen=True)
class _FovGrid:
    """`N_FOVS` FOVs side by side in one layout's global pixel frame."""

    x0: float
    y0: float
    width: int
    height: int
    y_sign: float  # +1: y_global = y_fov + y_local (legacy); -1: y_fov - y_local (AtoMx)

    @property
    def x(self) -> np.ndarray:
        """Global x of each FOV's origin (fov k + 1 at index k)."""
        return self.x0 + self.width * np.arange(N_FOVS)

    def fov_of(self, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
        """1-based FOV holding each global point, 0 outside every FOV."""
        k = np.floor((gx - self.x0) / self.width).astype(np.int64)
        local_y = (gy - self.y0) * self.y_sign
        inside = (k >= 0) & (k < N_FOVS) & (local_y >= 0) & (local_y < self.height)
        return np.where(inside, k + 1, 0)

    def local(
        self, fov: np.ndarray, gx: np.ndarray, gy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """FOV-local pixel coordinates of global points."""
        return gx - self.x[np.asarray(fov) - 1], (gy - self.y0) * self.y_sign


def write_cosmx_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    layout: Literal["atomx", "legacy"] = "atomx",
    seed: int = 0,
    n_genes: int = 40,
    n_negative: int = 4,
    rotation_deg: float = -3.0,
    landmark_noise_px: float = 1.0,
    sample: str = "synthetic_cosmx",
) -> GroundTruth:
    """Write CosMx flat files for `slide` and return the cells they encode.

    `GroundTruth` units are the exprMat cells (cell_ID > 0) with native coordinates computed
    from the written metadata like the adapter does; `extra["transcripts"]` holds every
    written transcript (x_um, y_um in that frame, target) for binned checks.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    spec = LAYOUTS[layout]
    px = float(spec["px_um"])
    (x0, y0), (width, height) = spec["origin_px"], spec["fov_px"]
    grid = _FovGrid(float(x0), float(y0), int(width), int(height), float(spec["y_sign"]))
    out_dir = Path(out_dir)
    bundle = out_dir / sample
    bundle.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 29])
    # FOV union centre (global px) -> native um (y turned down), placed on the slide centre.
    gy_mid = grid.y0 + grid.y_sign * grid.height / 2.0
    centre = ((grid.x0 + N_FOVS * grid.width / 2.0) * px, -gy_mid * px)
    matrix = placement(slide, centre, rotation_deg)
    gx, gy, fov, cell_id = _cell_centres(rng, slide, matrix, grid, px)

    genes = _panel(n_genes, n_negative, str(spec["negative"]), int(spec["n_system"]))
    r_px = 0.6 * CELL_UM / 2.0 / slide.mpp
    angles = np.arange(6) * np.pi / 3.0
    sx, sy = to_slide(matrix, gx * px, -gy * px)
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

    tx = _molecules(rng, counts, (gx, gy, fov, cell_id), grid, px, slide, matrix, genes)
    local_x, local_y = (np.round(v).astype(np.int64) for v in grid.local(fov, gx, gy))
    if layout == "legacy":  # global = fov position + integer local, as the NSCLC release
        gx_text, gx_read = as_written(grid.x[fov - 1] + local_x, 6)
        gy_text, gy_read = as_written(grid.y0 + local_y, 6)
    else:  # AtoMx rounds global and local independently
        gx_text, gx_read = as_written(np.round(gx), 0)
        gy_text, gy_read = as_written(np.round(gy), 0)
    area_px = int(round(circle_area_um2(CELL_UM) / px**2))
    meta = pd.DataFrame(
        {
            "fov": fov,
            "cell_ID": cell_id,
            "Area": area_px,
            "AspectRatio": 1.0,
            "CenterX_local_px": local_x,
            "CenterY_local_px": local_y,
            "CenterX_global_px": gx_text,
            "CenterY_global_px": gy_text,
            "Width": round(CELL_UM / px),
            "Height": round(CELL_UM / px),
            "Mean.DAPI": rng.integers(500, 5000, len(fov)),
        }
    )
    expr = _expression(counts, fov, cell_id, tx, genes, background_rows=layout == "legacy")
    prefix = bundle / sample
    if layout == "atomx":
        meta["cell_id"] = [f"c_1_{f}_{c}" for f, c in zip(fov, cell_id, strict=True)]
        meta = meta[ATOMX_METADATA]
        _polygons(fov, cell_id, gx, gy, grid, px).to_csv(f"{prefix}-polygons.csv", index=False)
    meta.to_csv(f"{prefix}_metadata_file.csv", index=False)
    expr.to_csv(f"{prefix}_exprMat_file.csv", index=False)
    positions = pd.DataFrame(
        {
            spec["fov_column"]: np.arange(1, N_FOVS + 1),
            "x_global_px": grid.x,
            "y_global_px": grid.y0,
        }
    )
    if layout == "atomx":
        positions["x_global_mm"] = grid.x * px / 1000.0
        positions["y_global_mm"] = grid.y0 * px / 1000.0
    positions.to_csv(f"{prefix}_fov_positions_file.csv", index=False)
    tx_table = _tx_table(tx, grid, layout)
    tx_table.to_csv(f"{prefix}_tx_file.csv", index=False)

    x_um, y_um = gx_read * px, -gy_read * px
    wx, wy = to_slide(matrix, x_um, y_um)
    transform_path = out_dir / "native_to_wsi.csv"
    write_transform_csv(transform_path, matrix)
    landmarks_path = write_landmarks(
        out_dir / "landmarks.csv",
        matrix,
        landmark_points(x_um, y_um),
        noise_px=landmark_noise_px,
        seed=seed,
    )
    written = tx_table[["x_global_px", "y_global_px"]].astype(np.float64).to_numpy()
    transcripts = pd.DataFrame(
        {
            "x_um": written[:, 0] * px,
            "y_um": -written[:, 1] * px,
            "target": tx_table["target"].to_numpy(),
        }
    )
    return GroundTruth(
        platform="cosmx",
        bundle=bundle,
        wsi_path=Path(slide.path),
        wsi_mpp=slide.mpp,
        native_to_wsi=matrix,
        unit_ids=np.array([f"{f}_{c}" for f, c in zip(fov, cell_id, strict=True)], dtype=object),
        x_native=x_um,
        y_native=y_um,
        x_wsi_px=wx,
        y_wsi_px=wy,
        x_slide_px=wx,
        y_slide_px=wy,
        region=samples[:, 0].astype(np.int64),
        in_tissue=(samples > 0).any(axis=1),
        counts=counts,
        genes=genes,
        unit_size_um=CELL_UM,
        transform_path=transform_path,
        region_names=slide.region_names,
        extra={
            "layout": layout,
            "px_size_um": px,
            "transcripts": transcripts,
            "landmarks_path": landmarks_path,
            "n_background": int((tx["cell"] == 0).sum()),
        },
    )


def _cell_centres(
    rng: np.random.Generator, slide: SyntheticSlide, matrix: np.ndarray, grid: _FovGrid, px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cells (global px, fov, cell_ID) on tissue, inside the slide and room for their molecules.

    A jittered grid of candidate centres over the slide; cell_ID counts from 1 in each FOV.
    """
    step, margin = CELL_PITCH_UM / slide.mpp, MARGIN_UM / slide.mpp
    cx, cy = np.meshgrid(
        np.arange(margin, slide.width - margin, step),
        np.arange(margin, slide.height - margin, step),
    )
    cx = cx.ravel() + rng.uniform(-0.25, 0.25, cx.size) * step
    cy = cy.ravel() + rng.uniform(-0.25, 0.25, cy.size) * step
    nx, ny = to_native(matrix, cx, cy)
    gx, gy = nx / px, -ny / px
    room = SPREAD_UM / px
    fov = grid.fov_of(gx, gy)
    inner = (grid.fov_of(gx - room, gy - room) == fov) & (grid.fov_of(gx + room, gy + room) == fov)
    on = (slide.region_at(cx, cy) > 0) & (fov > 0) & inner
    order = np.lexsort((gy[on], gx[on], fov[on]))
    gx, gy, fov = gx[on][order], gy[on][order], fov[on][order]
    cell_id = np.concatenate([np.arange(1, (fov == k).sum() + 1) for k in range(1, N_FOVS + 1)])
    return gx, gy, fov, cell_id


def _panel(n_genes: int, n_negative: int, negative: str, n_system: int) -> pd.DataFrame:
    """Gene panel by symbol, then negative probes and system control codes (CosMx names)."""
    genes = gene_panel(n_genes, n_controls=n_negative + n_system)
    names = [f"{negative}{i + 1}" for i in range(n_negative)]
    names += [f"SystemControl{i + 1}" for i in range(n_system)]
    genes.loc[n_genes:, "gene_id"] = names
    genes.loc[n_genes:, "symbol"] = names
    return genes


def _molecules(
    rng: np.random.Generator,
    counts: sp.csr_matrix,
    cells: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    grid: _FovGrid,
    px: float,
    slide: SyntheticSlide,
    matrix: np.ndarray,
    genes: pd.DataFrame,
) -> pd.DataFrame:
    """Every molecule: the cells' (within SPREAD_UM of their centre) and background ones."""
    gx, gy, fov, cell_id = cells
    coo = sp.coo_matrix(counts)
    cell = np.repeat(coo.row, coo.data)
    gene = np.repeat(coo.col, coo.data)
    radius = SPREAD_UM * np.sqrt(rng.random(cell.size)) / px
    angle = rng.uniform(0, 2 * np.pi, cell.size)
    mx, my = gx[cell] + radius * np.cos(angle), gy[cell] + radius * np.sin(angle)
    # Background: uniform over the covered slide, genes from the ambient (background) profile.
    margin = MARGIN_UM / slide.mpp
    area_um2 = (slide.width - 2 * margin) * (slide.height - 2 * margin) * slide.mpp**2
    n = rng.poisson(BACKGROUND_PER_UM2 * area_um2)
    bx = rng.uniform(margin, slide.width - margin, n)
    by = rng.uniform(margin, slide.height - margin, n)
    nx, ny = to_native(matrix, bx, by)
    bgx, bgy = nx / px, -ny / px
    bfov = grid.fov_of(bgx, bgy)
    keep = bfov > 0
    profile = region_profiles(genes, slide.region_names)[0]
    bgene = rng.choice(len(genes), keep.sum(), p=profile)
    return (
        pd.DataFrame(
            {
                "fov": np.concatenate([fov[cell], bfov[keep]]),
                "cell": np.concatenate([cell_id[cell], np.zeros(keep.sum(), np.int64)]),
                "gx": np.concatenate([mx, bgx[keep]]),
                "gy": np.concatenate([my, bgy[keep]]),
                "gene": np.concatenate([gene, bgene]),
                "name": genes["symbol"].to_numpy()[np.concatenate([gene, bgene])],
            }
        )
        .sort_values(["fov", "cell"], kind="stable")
        .reset_index(drop=True)
    )


def _expression(
    counts: sp.csr_matrix,
    fov: np.ndarray,
    cell_id: np.ndarray,
    tx: pd.DataFrame,
    genes: pd.DataFrame,
    *,
    background_rows: bool,
) -> pd.DataFrame:
    """exprMat: fov, cell_ID, one column per target (legacy: a cell_ID 0 row per FOV first)."""
    targets = genes["symbol"].tolist()
    table = pd.DataFrame(counts.toarray(), columns=targets)
    table.insert(0, "cell_ID", cell_id)
    table.insert(0, "fov", fov)
    if background_rows:
        bg = tx[tx["cell"] == 0]
        rows = np.zeros((N_FOVS, len(targets)), np.int64)
        np.add.at(rows, (bg["fov"].to_numpy() - 1, bg["gene"].to_numpy()), 1)
        background = pd.DataFrame(rows, columns=targets)
        background.insert(0, "cell_ID", 0)
        background.insert(0, "fov", np.arange(1, N_FOVS + 1))
        table = pd.concat([background, table]).sort_values(["fov", "cell_ID"], kind="stable")
    return table


def _tx_table(tx: pd.DataFrame, grid: _FovGrid, layout: str) -> pd.DataFrame:
    """Lay out the `*_tx_file.csv` rows in the layout's column order."""
    local_x, local_y = grid.local(tx["fov"].to_numpy(), tx["gx"].to_numpy(), tx["gy"].to_numpy())
    comp = np.where(tx["cell"] == 0, "0" if layout == "legacy" else "None", "Nuclear")
    z = (np.arange(len(tx)) * 7) % 8
    columns = {
        "fov": tx["fov"],
        "cell_ID": tx["cell"],
        "x_global_px": [f"{v:.4f}" for v in tx["gx"]],
        "y_global_px": [f"{v:.4f}" for v in tx["gy"]],
        "x_local_px": [f"{v:.4f}" for v in local_x],
        "y_local_px": [f"{v:.4f}" for v in local_y],
        "z": z,
        "target": tx["name"],
        "CellComp": comp,
    }
    table = pd.DataFrame(columns)
    if layout == "atomx":
        table.insert(
            2, "cell", [f"c_1_{f}_{c}" for f, c in zip(tx["fov"], tx["cell"], strict=True)]
        )
        order = [
            "fov",
            "cell_ID",
            "cell",
            "x_local_px",
            "y_local_px",
            "x_global_px",
            "y_global_px",
            "z",
            "target",
            "CellComp",
        ]
        table = table[order]
    return table


def _polygons(
    fov: np.ndarray,
    cell_id: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    grid: _FovGrid,
    px: float,
) -> pd.DataFrame:
    """AtoMx `-polygons.csv`: a hexagonal outline per cell, local and global vertices."""
    angles = np.arange(6) * np.pi / 3.0
    r = CELL_UM / 2.0 / px
    vx = np.round(gx[:, None] + r * np.cos(angles)).ravel()
    vy = np.round(gy[:, None] + r * np.sin(angles)).ravel()
    f = np.repeat(fov, 6)
    return pd.DataFrame(
        {
            "fov": f,
            "cellID": np.repeat(cell_id, 6),
            "cell": np.repeat([f"c_1_{a}_{b}" for a, b in zip(fov, cell_id, strict=True)], 6),
            "x_local_px": (vx - np.round(grid.x[f - 1])).astype(np.int64),
            "y_local_px": ((vy - grid.y0) * grid.y_sign).astype(np.int64),
            "x_global_px": vx.astype(np.int64),
            "y_global_px": vy.astype(np.int64),
        }
    )
