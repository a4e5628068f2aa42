"""The streaming loader: PairDataset (IterableDataset over corpora) and pair_collate.

Names are imported lazily so that ``import histmol.data`` stays cheap (torch loads on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histmol.data.collate import pair_collate, to_float_chw
    from histmol.data.dataset import PairDataset
    from histmol.data.genes import GENE_STATS, GeneSet, resolve_genes

__all__ = ["GENE_STATS", "GeneSet", "PairDataset", "pair_collate", "resolve_genes", "to_float_chw"]

# name -> module that defines it; the keys are exactly `__all__`
_EXPORTS = {
    "GENE_STATS": "histmol.data.genes",
    "GeneSet": "histmol.data.genes",
    "PairDataset": "histmol.data.dataset",
    "pair_collate": "histmol.data.collate",
    "resolve_genes": "histmol.data.genes",
    "to_float_chw": "histmol.data.collate",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
