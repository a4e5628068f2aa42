"""Synthetic Stereo-seq (SAW v7 / v8) outputs over a synthetic H&E slide.

Why: the Stereo-seq adapter must be tested on SAW's own files with a known answer. The chip's
DNB grid (0.5 um) is the slide's pixel grid, as SAW's registered image is: the slide, at
0.5 um/px, is copied in as `<chip>_HE_regist.tif`. Expression is drawn per 2 x 2 DNB block from
the block's region programme and each molecule lands on a random DNB of its block. Matrices
store coordinates relative to the expressed area's minimum, which goes into the offsets, as
geftools does.

Files (in `<out_dir>/`): `<chip>.tissue.gem.gz` (GEMv0.1 header with #OffsetX / #OffsetY; SAW v8
columns geneID, geneName, x, y, MIDCount, ExonCount; SAW v7 geneID (the name), x, y, MIDCount) or
`<chip>.tissue.gef` (geneExp/bin1 expression + gene, minX / minY / resolution attributes), and
with `cellbin=True` `<chip>.cellbin.gef` (cellBin/cell, cellExp, gene, geneExp, cellBorder).
Formats: SAW manual "Expression matrix format"; STOmics/geftools `bgef_writer.cpp`.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from histmol.synth.expression import GroundTruth, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide

DNB_UM = 0.5
BLOCK = 2  # DNBs per side of a simulation block
EDGE_MARGIN_UM = 40.0  # expression stays this far inside the chip: bin centres stay on the image
CELL_PITCH_DNB = 22
CELL_RADIUS_DNB = 8
BORDER_POINTS = 32


def write_stereo_seq_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    seed: int = 0,
    n_genes: int = 60,
    matrix: Literal["gem", "gef"] = "gem",
    saw_version: Literal[7, 8] = 8,
    cellbin: bool = False,
    chip: str = "SS200000135TL_D1",
) -> GroundTruth:
    """Write SAW outputs for `slide` (at 0.5 um/px) and return the DNB-level truth.

    Units of the truth are the expressed DNBs (bin1) in chip coordinates, continuous (DNB i
    spans [i, i + 1)). With `cellbin`, `extra` holds the cells: ids, centres, areas, counts.
    """
    if abs(slide.mpp - DNB_UM) > 1e-9:
        raise ValueError(f"the slide must be at the DNB pitch {DNB_UM} um/px, got {slide.mpp}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    margin = int(EDGE_MARGIN_UM / DNB_UM)
    bx, by = np.meshgrid(np.arange(margin, slide.width - margin - BLOCK, BLOCK),
                         np.arange(margin, slide.height - margin - BLOCK, BLOCK))
    bx, by = bx.ravel(), by.ravel()
    region = slide.region_at(bx + BLOCK / 2, by + BLOCK / 2).astype(np.int64)
    genes = gene_panel(n_genes)
    blocks = simulate_counts(region, n_genes=n_genes, unit_area_um2=(BLOCK * DNB_UM) ** 2,
                             seed=seed, genes=genes, region_names=slide.region_names).tocoo()
    rng = np.random.default_rng([int(seed), 83])
    block = np.repeat(blocks.row, blocks.data)
    gene = np.repeat(blocks.col, blocks.data).astype(np.int64)
    x = bx[block] + rng.integers(0, BLOCK, len(block))
    y = by[block] + rng.integers(0, BLOCK, len(block))
    dnb, dnb_index = np.unique(np.column_stack([y, x]), axis=0, return_inverse=True)
    counts = sp.csr_matrix((np.ones(len(gene), np.int32), (dnb_index.ravel(), gene)),
                           shape=(len(dnb), n_genes))
    counts.sum_duplicates()
    dnb_y, dnb_x = dnb[:, 0], dnb[:, 1]
    offset = (int(dnb_x.min()), int(dnb_y.min()))
    exon = counts.copy()
    exon.data = (exon.data * 0.8).astype(np.int32)
    stem = out / chip
    if matrix == "gem":
        path = _write_gem(Path(f"{stem}.tissue.gem.gz"), dnb_x, dnb_y, counts, exon, genes,
                          offset, saw_version, chip)
    else:
        path = _write_bin_gef(Path(f"{stem}.tissue.gef"), dnb_x, dnb_y, counts, exon, genes,
                              offset, saw_version)
    image = out / f"{chip}_HE_regist.tif"
    shutil.copyfile(slide.path, image)
    extra: dict[str, object] = {"matrix": path, "offset": offset, "saw_version": saw_version}
    if cellbin:
        extra.update(_write_cellbin(Path(f"{stem}.cellbin.gef"), slide, dnb_x, dnb_y, counts,
                                    genes, offset, saw_version, rng))
    xn, yn = dnb_x + 0.5, dnb_y + 0.5
    return GroundTruth(
        platform="stereo-seq", bundle=out, wsi_path=image, wsi_mpp=DNB_UM,
        native_to_wsi=np.eye(3),
        unit_ids=np.array([f"{a}_{b}" for a, b in zip(dnb_x, dnb_y, strict=True)], dtype=object),
        x_native=xn, y_native=yn, x_wsi_px=xn, y_wsi_px=yn, x_slide_px=xn, y_slide_px=yn,
        region=slide.region_at(xn, yn).astype(np.int64), in_tissue=slide.region_at(xn, yn) > 0,
        counts=sp.csr_matrix(counts, dtype=np.int32), genes=genes, unit_size_um=DNB_UM,
        region_names=slide.region_names, extra=extra,
    )


def _write_gem(path: Path, x: np.ndarray, y: np.ndarray, counts: sp.csr_matrix,
               exon: sp.csr_matrix, genes: pd.DataFrame, offset: tuple[int, int],
               saw_version: int, chip: str) -> Path:
    """GEMv0.1 as `saw convert gef2gem` writes it: header lines, then one row per (gene, DNB)."""
    coo, exon_coo = counts.tocsc().tocoo(), exon.tocsc().tocoo()  # gene-major, like geftools
    # SAW v8 writes Ensembl ids beside names; older SAW wrote the gene name as geneID
    key = "gene_id" if saw_version == 8 else "symbol"
    table = {"geneID": genes[key].to_numpy()[coo.col]}
    if saw_version == 8:
        table["geneName"] = genes["symbol"].to_numpy()[coo.col]
    table.update(x=x[coo.row] - offset[0], y=y[coo.row] - offset[1], MIDCount=coo.data)
    if saw_version == 8:
        table["ExonCount"] = exon_coo.data
    header = (f"#FileFormat=GEMv0.1\n#SortedBy=None\n#BinType=Bin\n#BinSize=1\n"
              f"#Omics=Transcriptomics\n#Stereo-seqChip={chip}\n"
              f"#OffsetX={offset[0]}\n#OffsetY={offset[1]}\n")
    body = io.StringIO()
    pd.DataFrame(table).to_csv(body, sep="\t", index=False)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write((header + body.getvalue()).encode())
    return path


def _gene_table(genes: pd.DataFrame, extra: dict[str, np.ndarray], saw_version: int) -> np.ndarray:
    """Compound gene rows: SAW v8 geneID + geneName, SAW v7 a single `gene` field."""
    fields: list[tuple[str, object]] = (
        [("geneID", "S64"), ("geneName", "S64")] if saw_version == 8 else [("gene", "S64")])
    fields += [(name, values.dtype) for name, values in extra.items()]
    table = np.zeros(len(genes), dtype=fields)
    if saw_version == 8:
        table["geneID"] = genes["gene_id"].astype(str).str.encode("utf-8")
        table["geneName"] = genes["symbol"].astype(str).str.encode("utf-8")
    else:
        table["gene"] = genes["symbol"].astype(str).str.encode("utf-8")
    for name, values in extra.items():
        table[name] = values
    return table


def _write_bin_gef(path: Path, x: np.ndarray, y: np.ndarray, counts: sp.csr_matrix,
                   exon: sp.csr_matrix, genes: pd.DataFrame, offset: tuple[int, int],
                   saw_version: int) -> Path:
    """geneExp/bin1 of a bin GEF: rows grouped by gene, coordinates relative to minX / minY."""
    csc, exon_csc = counts.tocsc(), exon.tocsc()
    csc.sort_indices()
    exon_csc.sort_indices()
    expression = np.zeros(csc.nnz, dtype=[("x", "<i4"), ("y", "<i4"), ("count", "u1")])
    expression["x"] = x[csc.indices] - offset[0]
    expression["y"] = y[csc.indices] - offset[1]
    expression["count"] = csc.data
    spans = np.diff(csc.indptr)
    gene = _gene_table(genes, {"offset": csc.indptr[:-1].astype(np.uint32),
                               "count": spans.astype(np.uint32)}, saw_version)
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.uint32(4 if saw_version == 8 else 2)
        f.attrs["omics"] = np.bytes_("Transcriptomics")
        group = f.create_group("geneExp/bin1")
        dataset = group.create_dataset("expression", data=expression)
        for key, value in (("minX", offset[0]), ("minY", offset[1]), ("maxX", int(x.max())),
                           ("maxY", int(y.max())), ("maxExp", int(csc.data.max()))):
            dataset.attrs[key] = np.int32(value)
        dataset.attrs["resolution"] = np.uint32(500)
        group.create_dataset("gene", data=gene)
        group.create_dataset("exon", data=exon_csc.data.astype(np.uint8))
    return path


def _write_cellbin(path: Path, slide: SyntheticSlide, x: np.ndarray, y: np.ndarray,
                   counts: sp.csr_matrix, genes: pd.DataFrame, offset: tuple[int, int],
                   saw_version: int, rng: np.random.Generator) -> dict[str, object]:
    """Disc cells on a jittered grid over the tissue; each owns the expressed DNBs in its disc."""
    gx, gy = np.meshgrid(np.arange(x.min(), x.max(), CELL_PITCH_DNB),
                         np.arange(y.min(), y.max(), CELL_PITCH_DNB))
    cx = gx.ravel() + rng.integers(-3, 4, gx.size)
    cy = gy.ravel() + rng.integers(-3, 4, gy.size)
    keep = slide.region_at(cx + 0.5, cy + 0.5) > 0
    cx, cy = cx[keep], cy[keep]
    radius = rng.integers(CELL_RADIUS_DNB - 2, CELL_RADIUS_DNB + 3, len(cx))
    # each expressed DNB joins the nearest cell centre, when inside that cell's disc
    dist, nearest = cKDTree(np.column_stack([cx, cy])).query(
        np.column_stack([x, y]), distance_upper_bound=CELL_RADIUS_DNB + 2)
    inside = np.isfinite(dist)
    inside[inside] = dist[inside] <= radius[nearest[inside]]
    owner = np.where(inside, nearest, -1)
    members = np.flatnonzero(owner >= 0)
    assign = sp.csr_matrix((np.ones(len(members), np.int32), (owner[members], members)),
                           shape=(len(cx), len(x)))
    cell_counts = sp.csr_matrix(assign @ counts)
    cell_counts.sort_indices()
    offsets = np.arange(-CELL_RADIUS_DNB - 2, CELL_RADIUS_DNB + 3)
    lattice = offsets[:, None] ** 2 + offsets[None, :] ** 2
    area = np.array([(lattice <= r * r).sum() for r in radius])  # DNBs in the disc
    ok = np.diff(cell_counts.indptr) > 0
    cx, cy, area, cell_counts = cx[ok], cy[ok], area[ok], cell_counts[ok]
    spans = np.diff(cell_counts.indptr)
    cells = np.zeros(len(cx), dtype=[("id", "<u4"), ("x", "<i4"), ("y", "<i4"), ("offset", "<u4"),
                                     ("geneCount", "<u2"), ("expCount", "<u2"), ("dnbCount", "<u2"),
                                     ("area", "<u2"), ("cellTypeID", "<u2"), ("clusterID", "<u2")])
    cells["id"] = np.arange(len(cx))
    cells["x"], cells["y"] = cx - offset[0], cy - offset[1]
    cells["offset"] = cell_counts.indptr[:-1]
    cells["geneCount"] = spans
    cells["expCount"] = np.asarray(cell_counts.sum(axis=1)).ravel()
    cells["dnbCount"] = np.asarray(assign[ok].sum(axis=1)).ravel()
    cells["area"] = area
    cell_exp = np.zeros(cell_counts.nnz, dtype=[("geneID", "<u4"), ("count", "<u2")])
    cell_exp["geneID"], cell_exp["count"] = cell_counts.indices, cell_counts.data
    by_gene = cell_counts.tocsc()
    by_gene.sort_indices()
    gene = _gene_table(genes, {
        "offset": by_gene.indptr[:-1].astype(np.uint32),
        "cellCount": np.diff(by_gene.indptr).astype(np.uint32),
        "expCount": np.asarray(by_gene.sum(axis=0)).ravel().astype(np.uint32),
        "maxMIDcount": np.asarray(by_gene.max(axis=0).todense()).ravel().astype(np.uint16),
    }, saw_version)
    gene_exp = np.zeros(by_gene.nnz, dtype=[("cellID", "<u4"), ("count", "<u2")])
    gene_exp["cellID"], gene_exp["count"] = by_gene.indices, by_gene.data
    angles = np.linspace(0, 2 * np.pi, BORDER_POINTS, endpoint=False)
    border = np.stack([np.round(radius[ok, None] * np.cos(angles)),
                       np.round(radius[ok, None] * np.sin(angles))], axis=2).astype(np.int16)
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.uint32(4 if saw_version == 8 else 2)
        f.attrs["offsetX"], f.attrs["offsetY"] = np.int32(offset[0]), np.int32(offset[1])
        f.attrs["resolution"] = np.uint32(500)
        group = f.create_group("cellBin")
        group.create_dataset("cell", data=cells)
        group.create_dataset("cellExp", data=cell_exp)
        group.create_dataset("gene", data=gene)
        group.create_dataset("geneExp", data=gene_exp)
        group.create_dataset("cellBorder", data=border)
    return {"cellbin": path, "cell_ids": np.array([f"cell{i}" for i in range(len(cx))], object),
            "cell_x_native": cx + 0.5, "cell_y_native": cy + 0.5,
            "cell_area_um2": area * DNB_UM**2, "cell_counts": cell_counts}
