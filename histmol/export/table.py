"""A committed section as an AnnData table: units x the section's panel, raw integer counts.

Shared by both exporters. Rows are the units in pair order (``obs`` index ``unit_id``), columns
the section's panel in vocabulary order (``var`` index ``gene_id``, with ``symbol``,
``ensembl_id``, ``species`` and the stable gene index ``vocabulary_index``). Counts stay raw
(int32, never normalised), as the corpus stores them (DESIGN.md "Corpus layout").
"""

from __future__ import annotations

from typing import Any

import anndata
import numpy as np
import pandas as pd

from histmol.qc.section_data import StoredSection


def section_table(section: StoredSection, genes: pd.DataFrame) -> anndata.AnnData:
    """Units x panel AnnData of raw counts; section facts in ``uns['histmol']``."""
    if section.counts is None:
        raise ValueError(f"section {section.section_id!r} was loaded without counts")
    panel = np.sort(np.asarray(section.row["panel"], dtype=np.int64))
    rows = np.searchsorted(genes["index"].to_numpy(), panel)  # stable index -> genes row
    var = genes.iloc[rows].reset_index(drop=True).rename(columns={"index": "vocabulary_index"})
    var.index = pd.Index(var["gene_id"].astype(str).to_numpy(), name="gene_id")
    var = var.drop(columns=["gene_id"])
    obs = section.units.copy()
    obs.index = pd.Index(obs.pop("unit_id").astype(str).to_numpy(), name="unit_id")
    matrix = section.counts[:, rows].astype(np.int32).tocsr()
    matrix.sort_indices()
    table = anndata.AnnData(X=matrix, obs=obs, var=var)
    table.uns["histmol"] = section_facts(section)
    return table


def section_facts(section: StoredSection) -> dict[str, Any]:
    """Convert the section's row to h5ad/zarr-writable values: no nulls, lists as arrays."""
    facts: dict[str, Any] = {}
    for key, value in section.row.items():
        if key == "panel" or value is None:
            continue
        if isinstance(value, float) and np.isnan(value):
            continue
        if isinstance(value, list | tuple | np.ndarray):
            facts[key] = np.asarray(value)
        elif isinstance(value, np.generic):
            facts[key] = value.item()
        else:
            facts[key] = value
    facts["native_to_wsi"] = section.native_to_wsi
    return facts
