"""Per-section facts the loader needs at open (platform, tissue, panel), read column-wise.

``CorpusSource.section_rows`` turns every row into Python objects, panel lists included; for a
histMol-sized corpus (3,446 sections, panels of up to ~25,000 genes) that is ~50 M Python ints
and most of the loader's open time. Here the panels stay NumPy views of the Arrow list column and
equal panels (one per assay and species) are shared, so the loader builds one panel mask per
distinct panel instead of one per section.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from histmol.data.source import CorpusSource
from histmol.errors import CorpusError
from histmol.shards.corpus import SECTIONS


@dataclass(frozen=True)
class SectionFacts:
    """One live section: its platform, tissue and panel (vocabulary indices, shared)."""

    platform: str
    tissue: str
    panel: np.ndarray | None
    panel_key: int  # equal panels (within a corpus) have equal keys


def _text(table: pa.Table, name: str) -> list[str]:
    if name not in table.column_names:
        return [""] * table.num_rows
    return [str(v or "") for v in table.column(name).to_pylist()]


def live_section_facts(source: CorpusSource) -> dict[str, SectionFacts]:
    """Committed sections by id (the manifest decides which are live), as `SectionFacts`."""
    live = pc.unique(source.manifest.column("section_id"))
    table = source.sections
    table = table.filter(pc.is_in(table.column("section_id"), value_set=live))
    ids = table.column("section_id").to_pylist()
    if len(set(ids)) != len(live):
        missing = sorted(set(live.to_pylist()) - set(ids))
        raise CorpusError(
            f"{source.describe(SECTIONS)}: no rows for sections {missing[:5]} of the manifest"
        )
    platforms, tissues = _text(table, "platform"), _text(table, "tissue")
    panels = table.column("panel").combine_chunks()
    offsets = panels.offsets.to_numpy()
    values = panels.values.to_numpy(zero_copy_only=False)
    valid = panels.is_valid().to_numpy(zero_copy_only=False)
    shared: dict[bytes, tuple[int, np.ndarray]] = {}
    facts = {}
    for i, section_id in enumerate(ids):
        panel = values[offsets[i]:offsets[i + 1]] if valid[i] else None
        key = -1
        if panel is not None:
            key, panel = shared.setdefault(panel.tobytes(), (len(shared), panel))
        facts[section_id] = SectionFacts(platforms[i], tissues[i], panel, key)
    return facts
