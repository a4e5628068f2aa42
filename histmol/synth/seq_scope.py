"""Synthetic Seq-Scope bundles in NovaScope's SGE layout over a synthetic slide.

Why: the Seq-Scope adapter must be tested on the exact files NovaScope writes, with a known
answer. Files, per NovaScope's "Rule dge2sdge" docs (https://seqscope.github.io/NovaScope/),
under `<out_dir>/sge/`: `barcodes.tsv.gz` (barcode, index, STARsolo index, lane, tile, X, Y in
nanometres, five per-barcode totals), `features.tsv.gz` (id, symbol, index, five totals),
`matrix.mtx.gz` (MatrixMarket; feature, barcode and five counts per entry: Gene, GeneFull,
Spliced, Unspliced, Ambiguous) and `barcodes.minmax.tsv`.

Sequencing clusters sit at random positions, and only barcodes that captured something are
listed, as in a real SGE. The SGE frame is the slide's with x and y swapped (NovaScope's
`historef` swaps them by default) and slightly rotated, so the ground-truth transform
(`<out_dir>/native_to_wsi.csv`, SGE nanometres -> slide level-0 px) mirrors.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.registration import apply_affine
from histmol.synth.expression import GroundTruth, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide
from histmol.synth.visium import write_transform_csv

NM_PER_UM = 1000.0
CHIP_CENTRE_NM = (4_500_000.0, 2_750_000.0)  # somewhere inside a NovaSeq S4 chip section
SWAP = np.array([[0.0, 1.0], [1.0, 0.0]])


def write_text_gz(path: Path, text: str) -> None:
    """Gzip (fast level 1) with no timestamp or name in the header: reruns are byte-identical."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz,
    ):
        gz.write(text.encode())


def random_points(
    slide: SyntheticSlide, density_per_um2: float, margin_um: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random capture positions (slide level-0 px) inside a margin of the slide."""
    margin = margin_um / slide.mpp
    x0, x1, y0, y1 = margin, slide.width - margin, margin, slide.height - margin
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"slide too small for a {margin_um} um margin")
    n = int(round(density_per_um2 * (x1 - x0) * (y1 - y0) * slide.mpp**2))
    return rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)


def random_barcodes(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct random nucleotide barcodes, sorted (as Python strings)."""
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    found = np.zeros(0, dtype=f"S{length}")
    while len(found) < n:
        codes = letters[rng.integers(0, 4, (n - len(found), length))]
        found = np.unique(np.concatenate([found, codes.view(f"S{length}").ravel()]))
    keep = np.sort(rng.choice(len(found), n, replace=False)) if len(found) > n else slice(None)
    return found[keep].astype(str).astype(object)


def sge_to_slide(slide: SyntheticSlide, rotation_deg: float) -> np.ndarray:
    """SGE nanometres -> slide px: axes swapped, rotated, scaled, chip centre on slide centre."""
    theta = np.deg2rad(rotation_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    linear = rotation @ SWAP / (NM_PER_UM * slide.mpp)
    shift = np.array([slide.width / 2.0, slide.height / 2.0]) - linear @ np.array(CHIP_CENTRE_NM)
    return np.array([[*linear[0], shift[0]], [*linear[1], shift[1]], [0.0, 0.0, 1.0]])


def _union(
    a: sp.csr_matrix, b: sp.csr_matrix
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Entries (row, col) non-zero in `a` or `b`, sorted by (row, col), with both values."""
    n_cols = a.shape[1]
    ca, cb = a.tocoo(), b.tocoo()
    ka = ca.row.astype(np.int64) * n_cols + ca.col
    kb = cb.row.astype(np.int64) * n_cols + cb.col
    keys = np.union1d(ka, kb)
    va = np.zeros(len(keys), np.int64)
    vb = np.zeros(len(keys), np.int64)
    va[np.searchsorted(keys, ka)] = ca.data
    vb[np.searchsorted(keys, kb)] = cb.data
    return keys // n_cols, keys % n_cols, va, vb


def _totals(columns: list[np.ndarray]) -> np.ndarray:
    """Five comma-separated totals per row, as NovaScope writes them."""
    text = np.asarray(columns[0]).astype(str)
    for column in columns[1:]:
        text = np.char.add(np.char.add(text, ","), np.asarray(column).astype(str))
    return text.astype(object)


def write_seq_scope_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    density_per_um2: float = 0.05,
    seed: int = 0,
    n_genes: int = 200,
    rotation_deg: float = 0.7,
    margin_um: float = 40.0,
) -> GroundTruth:
    """Write a NovaScope SGE folder for `slide` and return what it encodes.

    Units of the truth are the listed barcodes (clusters): `x_native`/`y_native` are their SGE
    coordinates in nm and `counts` their Gene counts; `extra["unspliced"]` holds the intronic
    counts that GeneFull adds (GeneFull = Gene + Unspliced, Spliced = Gene, Ambiguous = 0).
    """
    out_dir = Path(out_dir)
    sge = out_dir / "sge"
    sge.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 71])
    m = sge_to_slide(slide, rotation_deg)
    px, py = random_points(slide, density_per_um2, margin_um, rng)
    nx, ny = apply_affine(np.linalg.inv(m), px, py)
    nx, ny = np.round(nx), np.round(ny)  # NovaScope writes integer nanometres
    px, py = apply_affine(m, nx, ny)
    labels = slide.region_at(px, py)
    genes = gene_panel(n_genes)
    area = 1.0 / density_per_um2
    gene = simulate_counts(
        labels,
        n_genes=n_genes,
        unit_area_um2=area,
        seed=seed,
        genes=genes,
        region_names=slide.region_names,
    )
    unspliced = simulate_counts(
        labels,
        n_genes=n_genes,
        unit_area_um2=area * 0.2,
        seed=seed + 1,
        genes=genes,
        region_names=slide.region_names,
    )
    full = gene + unspliced
    keep = np.flatnonzero(np.asarray(full.sum(axis=1)).ravel() > 0)
    barcodes = random_barcodes(len(keep), 30, rng)  # sorted: row i is index i + 1
    order = rng.permutation(len(keep))  # positions in the unsorted STARsolo barcode list
    gene, unspliced, full = gene[keep], unspliced[keep], full[keep]
    nx, ny, px, py, labels = nx[keep], ny[keep], px[keep], py[keep], labels[keep]
    zero = np.zeros(len(keep), np.int64)

    g_tot, u_tot = np.asarray(gene.sum(axis=1)).ravel(), np.asarray(unspliced.sum(axis=1)).ravel()
    barcode_table = pd.DataFrame(
        {
            "barcode": barcodes,
            "index": np.arange(1, len(keep) + 1),
            "solo": order + 1,
            "lane": 1,
            "tile": 1,
            "x": nx.astype(np.int64),
            "y": ny.astype(np.int64),
            "totals": _totals([g_tot, g_tot + u_tot, g_tot, u_tot, zero]),
        }
    )
    write_text_gz(
        sge / "barcodes.tsv.gz", barcode_table.to_csv(sep="\t", header=False, index=False)
    )
    gf_tot, uf_tot = np.asarray(gene.sum(axis=0)).ravel(), np.asarray(unspliced.sum(axis=0)).ravel()
    feature_table = pd.DataFrame(
        {
            "id": genes["gene_id"],
            "name": genes["symbol"],
            "index": np.arange(1, n_genes + 1),
            "totals": _totals(
                [gf_tot, gf_tot + uf_tot, gf_tot, uf_tot, np.zeros(n_genes, np.int64)]
            ),
        }
    )
    write_text_gz(
        sge / "features.tsv.gz", feature_table.to_csv(sep="\t", header=False, index=False)
    )
    row, col, g_val, u_val = _union(gene, unspliced)
    entries = pd.DataFrame(
        {
            "f": col + 1,
            "b": row + 1,
            "g": g_val,
            "gf": g_val + u_val,
            "s": g_val,
            "u": u_val,
            "a": np.zeros(len(row), np.int64),
        }
    )
    header = (
        f"%%MatrixMarket matrix coordinate integer general\n%\n"
        f"{n_genes} {len(keep)} {len(entries)}\n"
    )
    write_text_gz(
        sge / "matrix.mtx.gz", header + entries.to_csv(sep=" ", header=False, index=False)
    )
    (sge / "barcodes.minmax.tsv").write_text(
        f"xmin\txmax\tymin\tymax\n{int(nx.min())}\t{int(nx.max())}\t{int(ny.min())}\t"
        f"{int(ny.max())}\n"
    )
    transform_path = out_dir / "native_to_wsi.csv"
    write_transform_csv(transform_path, m)
    return GroundTruth(
        platform="seq-scope",
        bundle=out_dir,
        wsi_path=Path(slide.path),
        wsi_mpp=slide.mpp,
        native_to_wsi=m,
        unit_ids=barcodes,
        x_native=nx,
        y_native=ny,
        x_wsi_px=px,
        y_wsi_px=py,
        x_slide_px=px,
        y_slide_px=py,
        region=labels.astype(np.int64),
        in_tissue=labels > 0,
        counts=sp.csr_matrix(gene, dtype=np.int32),
        genes=genes,
        unit_size_um=0.6,
        transform_path=transform_path,
        region_names=slide.region_names,
        extra={
            "unspliced": sp.csr_matrix(unspliced, dtype=np.int32),
            "density_per_um2": density_per_um2,
            "rotation_deg": rotation_deg,
        },
    )
