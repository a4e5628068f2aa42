"""Synthetic 10x Xenium (XOA 2.x) output folders over a synthetic H&E slide.

Why: the Xenium adapter must be tested on the files XOA writes, with a known answer for both
unit kinds (cells and binned transcripts) and a known H&E placement. The Xenium frame is in
micrometres; by default it is the slide rotated by a few degrees and shifted, so a swapped or
mis-scaled alignment cannot pass. Cells are discs on a jittered grid over the tissue; each cell's
counts come from its region's programme and become transcripts scattered in the disc, with
Phred qualities (about 8 % under Q20) and control codewords. As in XOA, the cell-feature matrix
counts only transcripts with qv >= 20 assigned to a cell; some transcripts lie outside cells.

Files (in `<out_dir>/`, per XOA "Understanding Xenium Outputs"): `experiment.xenium`,
`cells.parquet`, `cell_feature_matrix.h5`, `transcripts.parquet`,
`<sample>_he_imagealignment.csv` (H&E px -> morphology px, Xenium Explorer's export) and
`<sample>_he_keypoints.csv` (fixedX, fixedY, alignmentX, alignmentY). The H&E is the slide.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from histmol.synth.expression import GENE_EXPRESSION, GroundTruth, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.visium import write_transform_csv

PIXEL_SIZE_UM = 0.2125  # morphology image um/px on every Xenium instrument
CELL_PITCH_UM = 11.0
EDGE_MARGIN_UM = 30.0  # transcripts stay this far inside the slide: bin centres stay on it
LOW_QV_FRACTION = 0.08
UNASSIGNED_FRACTION = 0.05
CONTROLS = {  # feature name prefix -> XOA feature type
    "NegControlProbe_": "Negative Control Probe",
    "NegControlCodeword_": "Negative Control Codeword",
    "UnassignedCodeword_": "Unassigned Codeword",
}
SOFTWARE = "xenium-2.0.0.10"


def default_xenium_to_slide(slide: SyntheticSlide, angle_deg: float = 4.0) -> np.ndarray:
    """Xenium um -> slide px: the slide's centre is Xenium (W/2 + 100, H/2 + 150) um, rotated."""
    theta = np.deg2rad(angle_deg)
    k = 1.0 / slide.mpp
    centre_um = np.array([slide.width * slide.mpp / 2, slide.height * slide.mpp / 2]) + [100, 150]
    linear = k * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = np.array([slide.width / 2.0, slide.height / 2.0]) - linear @ centre_um
    return matrix


def xenium_features(n_genes: int, n_per_control: int = 4) -> pd.DataFrame:
    """Return the synthetic panel, then control features of each XOA control type."""
    genes = gene_panel(n_genes)
    rows = [(f"{prefix}{i:04d}", kind) for prefix, kind in CONTROLS.items()
            for i in range(n_per_control)]
    controls = pd.DataFrame({"gene_id": [r[0] for r in rows], "symbol": [r[0] for r in rows],
                             "ensembl_id": None, "feature_type": [r[1] for r in rows]})
    return pd.concat([genes, controls], ignore_index=True).astype({"ensembl_id": object})


def _apply(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def _inside(slide: SyntheticSlide, m: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    px, py = _apply(m, x, y)
    margin = EDGE_MARGIN_UM / slide.mpp
    inside_x = (px >= margin) & (px < slide.width - margin)
    return inside_x & (py >= margin) & (py < slide.height - margin)


def _cell_ids(n: int) -> np.ndarray:
    """XOA >= 1.3 cell ids: 8 letters a-p (the id's hex digits shifted) and a '-1' suffix."""
    digits = np.array(list("abcdefghijklmnop"))
    codes = (np.arange(n)[:, None] >> (4 * np.arange(7, -1, -1))[None, :]) & 15
    return np.array(["".join(digits[c]) + "-1" for c in codes], dtype=object)


def write_xenium_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    seed: int = 0,
    n_genes: int = 60,
    xenium_to_slide: np.ndarray | None = None,
    sample: str = "synthetic_xenium",
    row_group_size: int = 1 << 20,
) -> GroundTruth:
    """Write a Xenium output folder for `slide` and return what its cells encode.

    `xenium_to_slide` (um -> slide px, default `default_xenium_to_slide`) is the ground truth
    the alignment CSV encodes. The truth's units are the cells; its `genes` list the panel, then
    the control features (`feature_type` says which), and `counts` covers both (qv >= 20, as
    the cell-feature matrix). `extra` holds the transcripts path, the keypoints path and the
    numbers of transcripts written and kept (qv >= 20).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = default_xenium_to_slide(slide) if xenium_to_slide is None else np.asarray(xenium_to_slide)
    rng = np.random.default_rng([int(seed), 71])
    inv = np.linalg.inv(m)
    cx, cy = _apply(inv, np.array([0, slide.width, 0, slide.width], float),
                    np.array([0, 0, slide.height, slide.height], float))
    gx, gy = np.meshgrid(np.arange(cx.min(), cx.max(), CELL_PITCH_UM),
                         np.arange(cy.min(), cy.max(), CELL_PITCH_UM))
    x = gx.ravel() + rng.uniform(-2.0, 2.0, gx.size)
    y = gy.ravel() + rng.uniform(-2.0, 2.0, gy.size)
    keep = _inside(slide, m, x, y) & (slide.region_at(*_apply(m, x, y)) > 0)
    x, y = x[keep], y[keep]
    radius = rng.uniform(3.5, 5.5, len(x))
    area = np.pi * radius**2
    region = slide.region_at(*_apply(m, x, y)).astype(np.int64)
    features = xenium_features(n_genes)
    counts = simulate_counts(region, n_genes=n_genes, unit_area_um2=area, seed=seed,
                             genes=features, region_names=slide.region_names).tocoo()
    cell = np.repeat(counts.row, counts.data).astype(np.int64)
    gene = np.repeat(counts.col, counts.data).astype(np.int64)
    r, phi = radius[cell] * np.sqrt(rng.random(len(cell))), rng.uniform(0, 2 * np.pi, len(cell))
    tx, ty = x[cell] + r * np.cos(phi), y[cell] + r * np.sin(phi)
    # transcripts outside any cell: anywhere on the slide's usable area, random features
    n_free = int(UNASSIGNED_FRACTION * len(cell))
    fx = rng.uniform(cx.min(), cx.max(), 4 * n_free)
    fy = rng.uniform(cy.min(), cy.max(), 4 * n_free)
    inside = np.flatnonzero(_inside(slide, m, fx, fy))[:n_free]
    tx, ty = np.concatenate([tx, fx[inside]]), np.concatenate([ty, fy[inside]])
    gene = np.concatenate([gene, rng.integers(0, len(features), len(inside))])
    cell = np.concatenate([cell, np.full(len(inside), -1)])
    qv = np.where(rng.random(len(cell)) < LOW_QV_FRACTION, rng.uniform(5, 19.9, len(cell)),
                  rng.uniform(20, 40, len(cell))).astype(np.float32)
    order = rng.permutation(len(cell))
    tx, ty, gene, cell, qv = tx[order], ty[order], gene[order], cell[order], qv[order]
    ids = _cell_ids(len(x))
    good = (qv >= 20) & (cell >= 0)
    matrix = sp.csr_matrix((np.ones(int(good.sum()), np.int32), (cell[good], gene[good])),
                           shape=(len(x), len(features)), dtype=np.int32)
    matrix.sum_duplicates()
    _write_transcripts(out / "transcripts.parquet", tx, ty, gene, cell, qv, features, ids,
                       rng, row_group_size)
    _write_cells(out / "cells.parquet", ids, x, y, area, matrix, features)
    _write_h5(out / "cell_feature_matrix.h5", ids, matrix, features)
    (out / "experiment.xenium").write_text(json.dumps({
        "major_version": 5, "minor_version": 0, "patch_version": 0, "run_name": sample,
        "region_name": sample, "preservation_method": "ffpe", "num_cells": len(x),
        "pixel_size": PIXEL_SIZE_UM, "panel_name": "histmol synthetic", "panel_organism": "Human",
        "analysis_sw_version": SOFTWARE,
        "images": {"morphology_focus_filepath": "morphology_focus/morphology_focus_0000.ome.tif"},
    }, indent=2))
    he_to_morphology = np.diag([1 / PIXEL_SIZE_UM, 1 / PIXEL_SIZE_UM, 1.0]) @ inv
    alignment = out / f"{sample}_he_imagealignment.csv"
    write_transform_csv(alignment, he_to_morphology)
    keypoints = _write_keypoints(out / f"{sample}_he_keypoints.csv", slide, he_to_morphology)
    px, py = _apply(m, x, y)
    return GroundTruth(
        platform="xenium", bundle=out, wsi_path=Path(slide.path), wsi_mpp=slide.mpp,
        native_to_wsi=m, unit_ids=ids, x_native=x, y_native=y, x_wsi_px=px, y_wsi_px=py,
        x_slide_px=px, y_slide_px=py, region=region, in_tissue=np.ones(len(x), bool),
        counts=matrix, genes=features, unit_size_um=float(2 * np.sqrt(np.median(area) / np.pi)),
        transform_path=alignment, region_names=slide.region_names,
        extra={"transcripts": out / "transcripts.parquet", "keypoints": keypoints,
               "n_transcripts": len(cell), "n_transcripts_qv20": int((qv >= 20).sum()),
               "pixel_size": PIXEL_SIZE_UM},
    )


def _write_transcripts(path: Path, x: np.ndarray, y: np.ndarray, gene: np.ndarray,
                       cell: np.ndarray, qv: np.ndarray, features: pd.DataFrame,
                       ids: np.ndarray, rng: np.random.Generator, row_group_size: int) -> None:
    names = features["symbol"].to_numpy(object)
    n = len(x)
    table = pa.table({
        "transcript_id": pa.array(np.arange(n, dtype=np.uint64) + 281474976710656),
        "cell_id": pa.array(np.where(cell >= 0, ids[np.maximum(cell, 0)], "UNASSIGNED")
                            .astype(str)),
        "overlaps_nucleus": pa.array((rng.random(n) < 0.4).astype(np.uint8) * (cell >= 0)),
        "feature_name": pa.array(names[gene].astype(str)),
        "x_location": pa.array(x.astype(np.float32)),
        "y_location": pa.array(y.astype(np.float32)),
        "z_location": pa.array(rng.uniform(8, 20, n).astype(np.float32)),
        "qv": pa.array(qv),
        "fov_name": pa.array(np.full(n, "A1")),
        "nucleus_distance": pa.array(rng.uniform(0, 5, n).astype(np.float32)),
        "codeword_index": pa.array(gene.astype(np.int32)),
    })
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def _write_cells(path: Path, ids: np.ndarray, x: np.ndarray, y: np.ndarray, area: np.ndarray,
                 matrix: sp.csr_matrix, features: pd.DataFrame) -> None:
    kinds = features["feature_type"].to_numpy()
    per_kind = {k: np.asarray(matrix[:, np.flatnonzero(kinds == k)].sum(axis=1)).ravel()
                for k in (GENE_EXPRESSION, *CONTROLS.values())}
    total = np.asarray(matrix.sum(axis=1)).ravel()
    pq.write_table(pa.table({
        "cell_id": pa.array(ids.astype(str)), "x_centroid": x, "y_centroid": y,
        "transcript_counts": per_kind[GENE_EXPRESSION].astype(np.uint32),
        "control_probe_counts": per_kind["Negative Control Probe"].astype(np.uint32),
        "control_codeword_counts": per_kind["Negative Control Codeword"].astype(np.uint32),
        "unassigned_codeword_counts": per_kind["Unassigned Codeword"].astype(np.uint32),
        "total_counts": total.astype(np.uint32), "cell_area": area, "nucleus_area": 0.3 * area,
    }), path)


def _write_h5(path: Path, ids: np.ndarray, matrix: sp.csr_matrix, features: pd.DataFrame) -> None:
    """10x HDF5 feature-barcode matrix (CSC features x cells = CSR cells x features)."""
    csr = matrix.tocsr()
    csr.sort_indices()

    def strings(values: np.ndarray | pd.Series) -> np.ndarray:
        encoded = [str(v).encode() for v in values]
        return np.array(encoded, dtype=f"S{max(len(e) for e in encoded)}")

    with h5py.File(path, "w", libver="earliest", track_order=False) as f:
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["software_version"] = np.bytes_(SOFTWARE)
        f.attrs["version"] = np.int64(2)
        group = f.create_group("matrix")
        group["barcodes"] = strings(ids)
        group["data"] = csr.data.astype(np.int32)
        group["indices"] = csr.indices.astype(np.int64)
        group["indptr"] = csr.indptr.astype(np.int64)
        group["shape"] = np.array([csr.shape[1], csr.shape[0]], dtype=np.int32)
        feats = group.create_group("features")
        feats["id"] = strings(features["gene_id"])
        feats["name"] = strings(features["symbol"])
        feats["feature_type"] = strings(features["feature_type"])
        feats["genome"] = strings(["Unknown"] * len(features))


def _write_keypoints(path: Path, slide: SyntheticSlide, he_to_morphology: np.ndarray) -> Path:
    """Six H&E points spread over the slide and where the alignment puts them (exact)."""
    fx = np.array([0.2, 0.8, 0.5, 0.3, 0.7, 0.5]) * slide.width
    fy = np.array([0.2, 0.25, 0.5, 0.75, 0.8, 0.9]) * slide.height
    mx, my = _apply(he_to_morphology, fx, fy)
    pd.DataFrame({"fixedX": mx, "fixedY": my, "alignmentX": fx, "alignmentY": fy}).to_csv(
        path, index=False)
    return path
