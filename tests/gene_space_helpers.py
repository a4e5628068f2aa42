"""Write a section's units into a corpus the way the builder does (map_genes, shard writer,
commit), with flat synthetic patches: one unit per pair, the section's first units."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.genes import gene_qc, gene_table, infer_species
from histmol.shards.corpus import Corpus
from histmol.shards.shard_writer import SectionShardWriter

PX = 16


def write_counts(
    corpus: Corpus, section_id: str, genes: pd.DataFrame, counts: sp.csr_matrix, *,
    platform: str = "test", species: str | None = None, pairs_per_shard: int = 4,
) -> dict[str, Any]:
    """Commit one section: pair i holds unit i (row i of `counts`, columns = `genes` rows)."""
    species = species or infer_species(genes) or "unknown"
    index = corpus.map_genes(genes, species=species)
    counts = sp.csr_matrix(counts)
    staging = corpus.staging_dir(section_id)
    with SectionShardWriter(staging, patch_px=PX, pairs_per_shard=pairs_per_shard) as writer:
        for unit in range(counts.shape[0]):
            row = counts[unit]
            order = np.argsort(index[row.indices])
            writer.add_pair(np.full((PX, PX, 3), 40 + 10 * (unit % 20), dtype=np.uint8), {
                "unit_id": [f"{section_id}-{unit}"],
                "x_in_patch_px": np.array([PX / 2], dtype=np.float32),
                "y_in_patch_px": np.array([PX / 2], dtype=np.float32),
                "gene_idx": [index[row.indices][order].astype(np.int32)],
                "counts": [row.data[order].astype(np.int32)],
            })
    records = writer.close()
    return corpus.commit_section(section_id, staging, records=records, row={
        "platform": platform, "panel": np.sort(index), "species": species,
        "config_hash": "test", "input_fingerprint": section_id, **gene_qc(genes)})


def truth_columns(ids: object, symbols: object) -> pd.Series:
    """Stable gene index -> column of a ground-truth gene table, resolved as adapters do."""
    index = gene_table(np.asarray(ids, dtype=object), np.asarray(symbols, dtype=object))["index"]
    return pd.Series(np.arange(len(index)), index=index.to_numpy())
