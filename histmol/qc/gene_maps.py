"""Expression of a few informative genes over the histology (`genes.png`), beside total counts.

Total counts alone say little about registration: a pathologist checks that a marker gene's
pattern follows the tissue structure the H&E shows (layers, glands, tumour borders). The genes
are the user's (`--genes`, symbols or ids) or, by default, the section's most variable ones:
highest variance of log1p counts-per-10k among genes detected in at least 5 % of its units, so
a gene seen in three units cannot win on noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from histmol.errors import ConfigError
from histmol.qc.measures import Overlay
from histmol.qc.section_data import Background, StoredSection

__all__ = ["DEFAULT_N_GENES", "GeneMap", "gene_maps_figure", "pick_genes"]

DEFAULT_N_GENES = 3
MIN_DETECTED_FRACTION = 0.05
GENE_CMAP = "magma"
PANEL_IN, DPI, ALPHA = 4.2, 100, 0.8


@dataclass(frozen=True)
class GeneMap:
    """One gene to draw: its vocabulary index, label, and per-unit log1p CP10k values."""

    index: int
    label: str
    values: np.ndarray


def _log_cp10k(counts: sp.csr_matrix) -> sp.csr_matrix:
    totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    normed = sp.diags(scale) @ counts.astype(np.float64)
    return normed.log1p().tocsc()


def _label(genes: pd.DataFrame, index: int) -> str:
    row = genes.loc[index]
    symbol, gene_id = str(row.get("symbol") or ""), str(row.get("gene_id") or "")
    return symbol or gene_id


def _resolve(genes: pd.DataFrame, names: Sequence[str], panel: set[int]) -> list[int]:
    """Vocabulary indices of `names` (symbol or gene id, case-insensitive) in the section."""
    keys: dict[str, int] = {}
    for column in ("gene_id", "ensembl_id", "symbol"):
        if column in genes:
            for index, value in zip(genes.index, genes[column], strict=True):
                if isinstance(value, str) and value and index in panel:
                    keys.setdefault(value.lower(), int(index))
    found, missing = [], []
    for name in names:
        index = keys.get(name.strip().lower())
        (missing.append(name) if index is None else found.append(index))
    if missing:
        examples = ", ".join(sorted({_label(genes, i) for i in panel})[:8])
        raise ConfigError(
            f"gene(s) {', '.join(missing)} not measured in this section (e.g. {examples})"
        )
    return found


def pick_genes(
    section: StoredSection,
    genes: pd.DataFrame,
    names: Sequence[str] | None = None,
    n: int = DEFAULT_N_GENES,
) -> list[GeneMap]:
    """The genes to draw: `names` if given, else the section's `n` most variable genes.

    `section` must be loaded with counts; `genes` is the corpus vocabulary (indexed by its
    `index` column).
    """
    if section.counts is None:
        raise ValueError("load the section with counts=True")
    genes = genes.set_index("index") if "index" in genes.columns else genes
    expression = _log_cp10k(section.counts)
    detected = np.diff(section.counts.tocsc().indptr)
    panel = {int(i) for i in np.flatnonzero(detected)}
    if names:
        chosen = _resolve(genes, names, panel)
    else:
        n_units = section.counts.shape[0]
        mean = np.asarray(expression.mean(axis=0)).ravel()
        mean_sq = np.asarray(expression.multiply(expression).mean(axis=0)).ravel()
        variance = mean_sq - mean**2
        eligible = detected >= max(1, MIN_DETECTED_FRACTION * n_units)
        candidates = np.flatnonzero(eligible)
        # highest variance first; ties by vocabulary index, so the choice is reproducible
        order = candidates[np.lexsort((candidates, -variance[candidates]))]
        chosen = [int(i) for i in order[:n]]
    return [GeneMap(i, _label(genes, i), expression[:, i].toarray().ravel()) for i in chosen]


def gene_maps_figure(
    section: StoredSection,
    background: Background,
    maps: Sequence[GeneMap],
    over: Overlay,
    *,
    caption: str = "most variable genes",
) -> Figure:
    """Total counts, then one panel per gene, each over the same histology background.

    `over(values, norm, cmap, alpha, side)` is the background with per-unit values blended over
    it, at most `side` px (`figures.UnitLayer.over`).
    """
    panels = 1 + len(maps)
    height, width = background.image.shape[:2]
    figure = Figure(
        figsize=(PANEL_IN * panels, PANEL_IN * height / width + 1.0),
        dpi=DPI,
        layout="constrained",
    )
    axes = figure.subplots(1, panels, squeeze=False)[0]
    counts = section.units["total_counts"].to_numpy().clip(1).astype(np.float64)
    layers = [
        (
            "total counts (log)",
            counts,
            LogNorm(vmin=max(1.0, counts.min()), vmax=max(counts.max(), 10.0)),
            "viridis",
        )
    ]
    for gene in maps:
        top = float(np.percentile(gene.values, 99)) if len(gene.values) else 1.0
        layers.append(
            (f"{gene.label} (log1p CP10k)", gene.values, Normalize(0.0, max(top, 1e-6)), GENE_CMAP)
        )
    for ax, (title, values, norm, cmap) in zip(axes, layers, strict=True):
        ax.imshow(
            over(values, norm, cmap, ALPHA, round(PANEL_IN * DPI)),
            extent=background.extent,
            interpolation="antialiased",
        )
        figure.colorbar(
            ScalarMappable(norm, cmap), ax=ax, shrink=0.7, alpha=ALPHA, location="bottom"
        )
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        left, right, bottom, top = background.extent
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top)
    figure.suptitle(f"{section.section_id}: expression over the histology ({caption})", fontsize=11)
    return figure
