"""Gene keys and control probes.

A gene's key (`gene_id`) is its Ensembl id where the bundle gives one, else its symbol. Control
probes (negative controls, blanks, unassigned or deprecated codewords) are not genes: they are
dropped from expression and their per-unit totals kept as QC columns.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import scipy.sparse as sp

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
    """The species most of the panel's Ensembl ids belong to, or None when ids are absent."""
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


def gene_table(ids: list[str] | np.ndarray, symbols: list[str] | np.ndarray) -> pd.DataFrame:
    """Build the (gene_id, symbol, ensembl_id) table; gene_id is the Ensembl id when valid."""
    ids_s = pd.Series(np.asarray(ids, dtype=object)).astype(str).str.strip()
    symbols_s = pd.Series(np.asarray(symbols, dtype=object)).astype(str).str.strip()
    ensembl = ids_s.where(ids_s.map(is_ensembl_id), None).str.replace(r"\.\d+$", "", regex=True)
    gene_id = ensembl.where(ensembl.notna(), symbols_s)
    return pd.DataFrame(
        {
            "gene_id": gene_id.to_numpy(object),
            "symbol": symbols_s.to_numpy(object),
            "ensembl_id": ensembl.to_numpy(object),
        }
    )


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
    """Sum the columns of features that share a gene_id (e.g. a symbol listed twice)."""
    codes, uniques = pd.factorize(genes["gene_id"], sort=False)
    if len(uniques) == len(genes):
        return genes.reset_index(drop=True), sp.csr_matrix(counts)
    first = pd.Series(np.arange(len(genes))).groupby(codes).first().to_numpy()
    merge = sp.csr_matrix(
        (np.ones(len(codes), dtype=counts.dtype), (np.arange(len(codes)), codes)),
        shape=(len(codes), len(uniques)),
    )
    return genes.iloc[first].reset_index(drop=True), sp.csr_matrix(counts @ merge)
