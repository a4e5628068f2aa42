"""Summaries of a corpus on disk, as plain data (the CLI renders them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histmol.shards.corpus import Corpus

QC_WARN_DROPPED_TISSUE = 0.5
QC_WARN_MPP_DISAGREEMENT = 0.02


@dataclass(frozen=True)
class CorpusSummary:
    """Totals and one row per section."""

    root: Path
    sections: pd.DataFrame
    n_genes: int  # genes measured by some committed section
    totals: dict[str, int]
    by_platform: pd.DataFrame


def qc_flags(row: pd.Series) -> str:
    """Short comma-separated warnings worth a human look for one section."""
    flags: list[str] = []
    if row.get("status") == "failed":
        return "failed"
    planned = row.get("qc_n_pairs_planned") or 0
    dropped = row.get("qc_n_pairs_dropped_tissue") or 0
    if planned and dropped / planned > QC_WARN_DROPPED_TISSUE:
        flags.append(f"{dropped / planned:.0%} patches off tissue")
    for source in ("embedded", "scalefactors"):
        value = row.get(f"qc_mpp_{source}_vs_pitch")
        if value is not None and pd.notna(value) and value > QC_WARN_MPP_DISAGREEMENT:
            flags.append(f"{source} mpp off pitch by {value:.1%}")
    if row.get("mpp_source") == "estimated_from_pitch":
        flags.append("mpp estimated from pitch")
    if row.get("mpp_source") == "user":
        flags.append("mpp set by user")
    if bool(row.get("adjacent_section", False)):
        flags.append("adjacent-section H&E")
    return ", ".join(flags)


def summarise(root: str | Path) -> CorpusSummary:
    """Read a corpus' tables and compute totals; raises CorpusError when `root` is no corpus."""
    corpus = Corpus.open(root)
    sections = corpus.sections().copy()
    manifest = corpus.manifest()
    sizes = (
        manifest.assign(bytes=manifest["images_bytes"] + manifest["units_bytes"])
        .groupby("section_id")["bytes"]
        .sum()
        if len(manifest)
        else pd.Series(dtype="int64")
    )
    sections["bytes"] = sections["section_id"].map(sizes).fillna(0).astype("int64")
    sections["qc_flags"] = sections.apply(qc_flags, axis=1) if len(sections) else []
    committed = sections[sections["status"] == "committed"] if len(sections) else sections
    totals: dict[str, Any] = {
        "sections": int(len(committed)),
        "failed": int((sections["status"] == "failed").sum()) if len(sections) else 0,
        "pairs": int(committed["n_pairs"].sum()) if len(committed) else 0,
        "units": int(committed["n_units"].sum()) if len(committed) else 0,
        "shards": int(len(manifest)),
        "bytes": int(sections["bytes"].sum()) if len(sections) else 0,
    }
    by_platform = (
        committed.groupby("platform")
        .agg(
            sections=("section_id", "count"),
            pairs=("n_pairs", "sum"),
            units=("n_units", "sum"),
            bytes=("bytes", "sum"),
        )
        .reset_index()
        if len(committed)
        else pd.DataFrame(columns=["platform", "sections", "pairs", "units", "bytes"])
    )
    # genes.parquet lists every reference gene: count those some committed panel measured
    # A histMol-sized corpus holds ~50 M panel entries but a few dozen distinct panels: union
    # the distinct ones (a Python set of every entry took minutes).
    distinct = {np.asarray(p, dtype=np.int64).tobytes(): p for p in committed["panel"]
                if p is not None} if len(committed) else {}
    measured = len(np.unique(np.concatenate([np.asarray(p, dtype=np.int64)
                                             for p in distinct.values()]))) if distinct else 0
    return CorpusSummary(Path(root), sections, measured, totals, by_platform)
