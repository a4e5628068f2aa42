"""Small synthetic corpora for the loader tests, built with SectionShardWriter + Corpus directly.

Every value is a function of (section, pair, unit, gene), so tests can check a sample's patch,
expression, positions and panel exactly: `expected_units` recomputes what was written. Panels
name genes by token (``g0``..``g7``): the first eight human genes of the shipped reference
(stable indices 0..7), written by their Ensembl ids; `ENSEMBL`, `SYMBOL` and `tokens` translate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histmol.gene_reference import reference
from histmol.shards.corpus import Corpus
from histmol.shards.shard_writer import SectionShardWriter

PX = 16
_FIRST = reference().genes.iloc[:8]
ENSEMBL = {f"g{i}": str(e) for i, e in enumerate(_FIRST["ensembl_id"])}
SYMBOL = {f"g{i}": str(e) for i, e in enumerate(_FIRST["symbol"])}
TOKEN = {e: g for g, e in ENSEMBL.items()}


def tokens(gene_ids: list[str]) -> list[str]:
    """The tokens of emitted gene ids (Ensembl ids of the reference)."""
    return [TOKEN[g] for g in gene_ids]


@dataclass(frozen=True)
class SectionSpec:
    """One synthetic section: its metadata, size and panel (gene ids)."""

    section_id: str
    platform: str
    tissue: str
    n_pairs: int
    units_per_pair: int
    genes: tuple[str, ...]
    species: str = "human"
    extra: dict[str, object] = field(default_factory=dict)


DEFAULT_SECTIONS = (
    SectionSpec("s-visium", "visium", "colon", 10, 1, ("g0", "g1", "g2", "g3", "g4")),
    SectionSpec("s-hd", "visium-hd", "colon", 7, 3, ("g2", "g3", "g5", "g6")),
    SectionSpec("s-xenium", "xenium", "lung", 5, 2, ("g0", "g6", "g7")),
)


def patch_value(section_index: int, pair: int) -> int:
    """The flat grey level of a pair's patch (JPEG keeps flat patches within +-1)."""
    return (section_index * 50 + pair * 9 + 20) % 240


def expected_units(spec: SectionSpec, pair: int) -> list[dict[str, int]]:
    """Per unit of the pair: {gene_id: raw count} (zeros are not stored)."""
    units = []
    for unit in range(spec.units_per_pair):
        counts = {}
        for j, gene in enumerate(spec.genes):
            if (pair + unit + j) % 3 != 0:
                counts[gene] = 1 + (pair * 31 + unit * 7 + j * 3) % 11
        units.append(counts)
    return units


def unit_position(pair: int, unit: int) -> tuple[float, float]:
    """(x, y) in patch px of a unit."""
    return float(unit * 2 + 0.5), float(pair % PX)


def write_section(corpus: Corpus, index: int, spec: SectionSpec, pairs_per_shard: int) -> None:
    """Write and commit one section."""
    vocab = corpus.map_genes(pd.DataFrame({
        "gene_id": [ENSEMBL[g] for g in spec.genes], "symbol": [SYMBOL[g] for g in spec.genes],
        "ensembl_id": [ENSEMBL[g] for g in spec.genes]}), spec.species)
    position = {g: int(i) for g, i in zip(spec.genes, vocab, strict=True)}
    staging = corpus.staging_dir(spec.section_id)
    with SectionShardWriter(staging, patch_px=PX, pairs_per_shard=pairs_per_shard) as writer:
        for pair in range(spec.n_pairs):
            units = expected_units(spec, pair)
            xy = [unit_position(pair, u) for u in range(len(units))]
            writer.add_pair(np.full((PX, PX, 3), patch_value(index, pair), dtype=np.uint8), {
                "unit_id": [f"{spec.section_id}-{pair}-{u}" for u in range(len(units))],
                "x_in_patch_px": np.array([p[0] for p in xy], dtype=np.float32),
                "y_in_patch_px": np.array([p[1] for p in xy], dtype=np.float32),
                "total_counts": np.array([sum(u.values()) for u in units], dtype=np.int64),
                "gene_idx": [np.array(sorted(position[g] for g in u), dtype=np.int32)
                             for u in units],
                "counts": [np.array([u[g] for g in sorted(u, key=position.get)], dtype=np.int32)
                           for u in units],
            })
    records = writer.close()
    corpus.commit_section(spec.section_id, staging, records=records, row={
        "platform": spec.platform, "tissue": spec.tissue, "panel": np.sort(vocab),
        "config_hash": "test", "input_fingerprint": spec.section_id, **spec.extra})


def make_corpus(
    root: Path, sections: tuple[SectionSpec, ...] = DEFAULT_SECTIONS, pairs_per_shard: int = 4
) -> Path:
    """A committed corpus at `root` holding `sections`; returns `root`."""
    with Corpus.open(root, create=True, build_config={"patch_px": PX}) as corpus:
        for index, spec in enumerate(sections):
            write_section(corpus, index, spec, pairs_per_shard)
    return root
