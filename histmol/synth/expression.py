"""Gene panel, region-specific expression programmes and count simulation for synthetic bundles.

Why: a corpus builder must be tested on expression that is tied to morphology, so a model trained
on synthetic pairs can learn something and tests can check that markers follow regions. The panel
is the same for every section (a fixed function of its size), so synthetic sections merge into one
vocabulary; only sampling noise depends on the seed. Marker genes carry their real GRCh38 Ensembl
ids; filler genes get ids in an unused range (ENSG0009...) and `HSYN` symbols so they can never be
mistaken for, or resolved to, real genes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.genes import control_category
from histmol.synth.morphology import BACKGROUND, REGION_NAMES

GENE_EXPRESSION = "Gene Expression"
NEGATIVE_CONTROL = "Negative Control Probe"
DEFAULT_REGION_NAMES: tuple[str, ...] = (BACKGROUND, *REGION_NAMES)

# symbol -> Ensembl id (GRCh38), grouped by the region whose programme up-regulates them.
MARKERS: dict[str, dict[str, str]] = {
    "housekeeping": {
        "GAPDH": "ENSG00000111640", "ACTB": "ENSG00000075624", "B2M": "ENSG00000166710",
        "MALAT1": "ENSG00000251562", "TP53": "ENSG00000141510", "EGFR": "ENSG00000146648",
    },
    "tumour": {
        "EPCAM": "ENSG00000119888", "KRT8": "ENSG00000170421", "KRT18": "ENSG00000111057",
        "KRT19": "ENSG00000171345", "MKI67": "ENSG00000148773", "CDH1": "ENSG00000039068",
        "ERBB2": "ENSG00000141736", "ESR1": "ENSG00000091831",
    },
    "stroma": {
        "COL1A1": "ENSG00000108821", "COL1A2": "ENSG00000164692", "COL3A1": "ENSG00000168542",
        "DCN": "ENSG00000011465", "LUM": "ENSG00000139329", "FN1": "ENSG00000115414",
        "ACTA2": "ENSG00000107796", "VIM": "ENSG00000026025",
    },
    "immune": {
        "PTPRC": "ENSG00000081237", "CD3E": "ENSG00000198851", "CD8A": "ENSG00000153563",
        "CD4": "ENSG00000010610", "MS4A1": "ENSG00000156738", "CD19": "ENSG00000177455",
        "CD74": "ENSG00000019582", "IGKC": "ENSG00000211592", "IGHG1": "ENSG00000211896",
        "LYZ": "ENSG00000090382", "CD68": "ENSG00000129226",
    },
    "necrosis": {
        "HIF1A": "ENSG00000100644", "VEGFA": "ENSG00000112715", "SLC2A1": "ENSG00000117394",
        "CA9": "ENSG00000107159", "LDHA": "ENSG00000134333", "SPP1": "ENSG00000118785",
    },
    "gland": {
        "MUC1": "ENSG00000185499", "TFF1": "ENSG00000160182", "TFF3": "ENSG00000160180",
        "PIGR": "ENSG00000162896",
    },
}
# Relative RNA density per unit area (tissue regions) and ambient level on bare glass.
REGION_DENSITY = {"tumour": 1.3, "stroma": 0.7, "immune": 1.2, "necrosis": 0.4, "gland": 1.0}
BACKGROUND_DENSITY = 0.02
MARKER_FOLD = 12.0
_PANEL_SEED = 20240607  # fixed: the panel and programmes must not change between sections


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """What a synthetic bundle encodes, for tests to compare an adapter's output with.

    Units are the rows of the written count matrix. `x_native`/`y_native` are in the platform's
    native frame as written in the bundle (x = column); `x_wsi_px`/`y_wsi_px` are the unit centres
    in the section image's level-0 pixels and equal `native_to_wsi @ (x_native, y_native, 1)`.
    `x_slide_px`/`y_slide_px` place them on the synthetic slide (equal to the WSI frame unless the
    bundle's image is a crop or a rescale of the slide). `counts` is units x genes, raw int32.
    """

    platform: str
    bundle: Path
    wsi_path: Path
    wsi_mpp: float
    native_to_wsi: np.ndarray
    unit_ids: np.ndarray
    x_native: np.ndarray
    y_native: np.ndarray
    x_wsi_px: np.ndarray
    y_wsi_px: np.ndarray
    x_slide_px: np.ndarray
    y_slide_px: np.ndarray
    region: np.ndarray
    in_tissue: np.ndarray
    counts: sp.csr_matrix
    genes: pd.DataFrame
    unit_size_um: float
    transform_path: Path | None = None
    region_names: tuple[str, ...] = DEFAULT_REGION_NAMES
    extra: dict[str, object] = field(default_factory=dict)


def gene_panel(
    n_genes: int, *, n_controls: int = 0, control_prefix: str = "NegControlProbe_"
) -> pd.DataFrame:
    """The first `n_genes` genes of the synthetic panel, then `n_controls` control probes.

    Columns: gene_id, symbol, ensembl_id (None for controls), feature_type. Markers come first,
    interleaved across programmes so any panel of >= 30 genes has markers for every region.
    """
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}")
    groups = [list(g.items()) for g in MARKERS.values()]
    ordered: list[tuple[str, str]] = []
    for i in range(max(len(g) for g in groups)):
        ordered.extend(g[i] for g in groups if i < len(g))
    rows = [(gid, sym) for sym, gid in ordered[:n_genes]]
    for i in range(len(rows), n_genes):
        rows.append((f"ENSG0009{i:07d}", f"HSYN{i:04d}"))
    ids = [r[0] for r in rows]
    symbols = [r[1] for r in rows]
    table = pd.DataFrame(
        {"gene_id": ids, "symbol": symbols, "ensembl_id": ids, "feature_type": GENE_EXPRESSION}
    )
    if n_controls:
        names = [f"{control_prefix}{i:05d}" for i in range(n_controls)]
        controls = pd.DataFrame(
            {"gene_id": names, "symbol": names, "ensembl_id": None,
             "feature_type": NEGATIVE_CONTROL}
        )
        table = pd.concat([table, controls], ignore_index=True)
    return table.astype({"ensembl_id": object})


def region_profiles(
    genes: pd.DataFrame, region_names: Sequence[str] = DEFAULT_REGION_NAMES
) -> np.ndarray:
    """Expression composition per region: (n_regions, n_genes), rows sum to 1.

    A log-normal baseline (housekeeping genes high) times MARKER_FOLD on each region's markers,
    with mild region-specific noise; background is the mean tissue profile (ambient RNA).
    Control probes get a tiny constant share (they measure no transcript).
    """
    symbols = genes["symbol"].astype(str).to_numpy()
    if "feature_type" in genes:
        is_control = (genes["feature_type"] != GENE_EXPRESSION).to_numpy()
    else:
        is_control = np.array([control_category(s) is not None for s in symbols], bool)
    seeds = np.array([sum(ord(c) * 131**k for k, c in enumerate(s)) % 2**32 for s in symbols])
    base = np.exp(np.random.default_rng([_PANEL_SEED, 0]).normal(0.0, 1.0, 4096)[seeds % 4096])
    base[np.isin(symbols, list(MARKERS["housekeeping"]))] *= 8.0
    profiles = np.empty((len(region_names), len(genes)))
    for r, name in enumerate(region_names):
        if name == BACKGROUND:
            continue
        jitter = np.random.default_rng([_PANEL_SEED, 1 + r]).normal(0.0, 0.25, len(genes))
        prof = base * np.exp(jitter)
        prof[np.isin(symbols, list(MARKERS.get(name, {})))] *= MARKER_FOLD
        profiles[r] = prof
    tissue = [r for r, n in enumerate(region_names) if n != BACKGROUND]
    for r, name in enumerate(region_names):
        if name == BACKGROUND:
            profiles[r] = profiles[tissue].mean(axis=0) if tissue else base
    profiles[:, is_control] = 0.0
    profiles /= profiles.sum(axis=1, keepdims=True)
    profiles[:, is_control] = 2e-4
    return profiles / profiles.sum(axis=1, keepdims=True)


def simulate_counts(
    labels_per_unit: np.ndarray,
    *,
    n_genes: int,
    unit_area_um2: float | np.ndarray,
    seed: int,
    genes: pd.DataFrame | None = None,
    region_names: Sequence[str] = DEFAULT_REGION_NAMES,
    counts_per_um2: float = 1.5,
    dispersion: float = 0.2,
) -> sp.csr_matrix:
    """Raw counts (units x genes, CSR int32) drawn from the units' region programmes.

    `labels_per_unit` is (n_units,) region labels, or (n_units, k) labels sampled inside each
    unit (its expression is then the mixture). The mean total is `counts_per_um2` x area x the
    region's density (x n_genes / 200, so bigger panels capture more), with a log-normal library
    factor per unit. Counts are negative binomial (gamma-Poisson, var = m + dispersion m^2);
    where per-gene means are tiny (subcellular bins) the NB excess variance is negligible and
    counts are drawn as Poisson by sampling each molecule's gene, O(total counts), which is
    what keeps millions of 2 um bins cheap.
    """
    labels = np.asarray(labels_per_unit)
    labels = labels[:, None] if labels.ndim == 1 else labels
    genes = gene_panel(n_genes) if genes is None else genes
    if "feature_type" in genes and int((genes["feature_type"] == GENE_EXPRESSION).sum()) != n_genes:
        raise ValueError(f"n_genes={n_genes} does not match the {len(genes)}-feature gene table")
    n_units, n_feat = labels.shape[0], len(genes)
    if n_units == 0:
        return sp.csr_matrix((0, n_feat), dtype=np.int32)
    profiles = region_profiles(genes, region_names)
    density = np.array([
        BACKGROUND_DENSITY if n == BACKGROUND else REGION_DENSITY.get(n, 1.0) for n in region_names
    ])
    rng = np.random.default_rng([int(seed), 17])
    area = np.broadcast_to(np.asarray(unit_area_um2, np.float64), (n_units,))
    library = rng.lognormal(-0.06, 0.35, n_units)
    mean_total = counts_per_um2 * area * density[labels].mean(axis=1) * library * n_feat / 200.0
    if mean_total.mean() <= n_feat / 4.0:
        return _sample_molecules(labels, mean_total, profiles, rng)
    chunks = []
    step = max(1, 2_000_000 // n_feat)
    for u0 in range(0, n_units, step):
        lab = labels[u0 : u0 + step]
        mean = profiles[lab].mean(axis=1) * mean_total[u0 : u0 + step, None]
        lam = mean * rng.gamma(1.0 / dispersion, dispersion, mean.shape)
        chunks.append(sp.csr_matrix(rng.poisson(lam).astype(np.int32)))
    return sp.csr_matrix(sp.vstack(chunks, format="csr"), dtype=np.int32)


def _sample_molecules(
    labels: np.ndarray, mean_total: np.ndarray, profiles: np.ndarray, rng: np.random.Generator
) -> sp.csr_matrix:
    """Poisson counts by drawing each unit's total, then each molecule's source label and gene."""
    totals = rng.poisson(mean_total)
    unit = np.repeat(np.arange(len(totals)), totals)
    pick = rng.integers(0, labels.shape[1], unit.size)
    label = labels[unit, pick]
    cdf = np.cumsum(profiles, axis=1)
    cdf[:, -1] = 1.0
    gene = np.empty(unit.size, np.int64)
    u = rng.random(unit.size)
    for r in np.unique(label):
        sel = label == r
        gene[sel] = np.searchsorted(cdf[r], u[sel], side="right")
    coo = sp.coo_matrix(
        (np.ones(unit.size, np.int32), (unit, gene)), shape=(len(totals), profiles.shape[1])
    )
    return sp.csr_matrix(coo.tocsr(), dtype=np.int32)


def circle_area_um2(diameter_um: float) -> float:
    """Area of a round unit (spots, beads)."""
    return float(np.pi * diameter_um**2 / 4.0)
