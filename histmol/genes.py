"""Gene keys and control probes.

A gene's key (`gene_id`) is the Ensembl id of the reference gene its feature resolves to
(`histmol.gene_reference`: Ensembl id, current symbol, previous symbol or alias), or the explicit
``unresolved:<species>:<name>`` key of a feature that resolves to none; features resolving to one
gene are summed. Control probes (negative controls, blanks, unassigned or deprecated codewords)
are not genes: they are dropped from expression and their per-unit totals kept as QC columns.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.gene_reference import panel_species_of, resolve_features

ENSEMBL_PATTERN = re.compile(r"ENS[A-Z]*G\d{11}(\.\d+)?")

# Category -> name patterns, from the vendors' panels (Xenium, CosMx, MERSCOPE) and Space Ranger
# probe sets. Matched against the feature name (symbol); case-insensitive.
CONTROL_PATTERNS: dict[str, re.Pattern[str]] = {
    "negative_probe": re.compile(r"^(NegControlProbe_|NegPrb|Negative|antisense_)", re.I),
    "negative_codeword": re.compile(r"^NegControlCodeword_", re.I),
    "blank": re.compile(r"^(BLANK_|Blank-|Blank_)", re.I),
    "unassigned": re.compile(r"^(UnassignedCodeword_|Unassigned)", re.I),
    "deprecated": re.compile(r"^DeprecatedCodeword_", re.I),
    "system_control": re.compile(r"^(SystemControl|FalseCode|Intergenic_Region_)", re.I),
}
# Feature types in 10x feature tables that are not gene expression.
NON_GENE_FEATURE_TYPES = {
    "Antibody Capture",
    "CRISPR Guide Capture",
    "Custom",
    "Multiplexing Capture",
}


ENSEMBL_SPECIES_PREFIX = {
    "ENSG": "human",
    "ENSMUSG": "mouse",
    "ENSRNOG": "rat",
    "ENSDARG": "zebrafish",
}


def infer_species(genes: pd.DataFrame) -> str | None:
    """The panel's species: from its resolution (``mixed`` included), else its Ensembl ids.

    None when neither says (ids absent, or no species holds half of the panel).
    """
    resolved = panel_species_of(genes)
    if resolved is not None:
        return resolved
    prefixes = (
        genes["ensembl_id"].dropna().astype(str).str.extract(r"^(ENS[A-Z]*G)\d", expand=False)
    )
    counts = prefixes.map(ENSEMBL_SPECIES_PREFIX).value_counts()
    if counts.empty or counts.iloc[0] < 0.5 * len(genes):
        return None
    return str(counts.index[0])


def is_ensembl_id(value: str) -> bool:
    """True for a versioned or unversioned Ensembl gene id (ENSG..., ENSMUSG..., ...)."""
    return bool(ENSEMBL_PATTERN.fullmatch(value))


def control_category(name: str) -> str | None:
    """The control category of a feature name, or None for a real gene."""
    for category, pattern in CONTROL_PATTERNS.items():
        if pattern.match(name):
            return category
    return None


def gene_table(
    ids: list[str] | np.ndarray, symbols: list[str] | np.ndarray, species: str | None = None
) -> pd.DataFrame:
    """The panel's features resolved to the gene reference, one row per feature.

    Columns gene_id (reference Ensembl id or ``unresolved:<species>:<name>``), symbol,
    ensembl_id, feature (the name as given), species, resolved, index (stable global index):
    `histmol.gene_reference.resolve_features`. `species` None infers it from the panel.
    """
    return resolve_features(ids, symbols, species)


def gene_qc(genes: pd.DataFrame) -> dict[str, Any]:
    """Per-section QC of gene resolution: the resolved fraction and the unresolved names.

    ``qc_genes_resolved_fraction`` counts genes after duplicates were merged (a panel whose
    features are all unresolvable reads 0.0; an empty panel 1.0, nothing failed to resolve);
    ``genes_unresolved`` lists the unresolved features' names, sorted.
    """
    if "resolved" not in genes.columns:
        return {}
    resolved = genes["resolved"].to_numpy(bool)
    names = sorted(genes.loc[~resolved, "feature"].astype(str))
    return {
        "qc_genes_resolved_fraction": float(resolved.mean()) if len(resolved) else 1.0,
        "genes_unresolved": names,
    }


def split_controls(
    genes: pd.DataFrame, counts: sp.csr_matrix
) -> tuple[pd.DataFrame, sp.csr_matrix, pd.DataFrame]:
    """Separate control probes from genes.

    Returns the gene table and counts without controls, and a per-unit table with one int64
    column per control category present (totals over that category's probes).
    """
    categories = genes["symbol"].map(control_category)
    keep = categories.isna().to_numpy()
    counts = sp.csr_matrix(counts)
    controls: dict[str, np.ndarray] = {}
    for category in sorted(set(categories.dropna())):
        columns = np.flatnonzero((categories == category).to_numpy())
        controls[category] = np.asarray(counts[:, columns].sum(axis=1), dtype=np.int64).ravel()
    kept_genes = genes.loc[keep].reset_index(drop=True)
    kept_counts = sp.csr_matrix(counts[:, np.flatnonzero(keep)])
    return kept_genes, kept_counts, pd.DataFrame(controls)


def merge_duplicate_genes(
    genes: pd.DataFrame, counts: sp.csr_matrix
) -> tuple[pd.DataFrame, sp.csr_matrix]:
    """Sum the columns of features that share a gene_id; the first feature's row stays.

    Features share a gene_id when a symbol is listed twice or when an alias and a current
    symbol name one gene.
    """
    codes, uniques = pd.factorize(genes["gene_id"], sort=False)
    if len(uniques) == len(genes):
        return genes.reset_index(drop=True), sp.csr_matrix(counts)
    first = pd.Series(np.arange(len(genes))).groupby(codes).first().to_numpy()
    merge = sp.csr_matrix(
        (np.ones(len(codes), dtype=counts.dtype), (np.arange(len(codes)), codes)),
        shape=(len(codes), len(uniques)),
    )
    return genes.iloc[first].reset_index(drop=True), sp.csr_matrix(counts @ merge)
