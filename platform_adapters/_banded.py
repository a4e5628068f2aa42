"""Binned transcripts to units: band by band from a `BandedBinner` onto a `CountsStore`.

Shared by the transcript-binning adapters (xenium, cosmx, merscope): each band of bin rows goes
through the gene panel (control probes split out, duplicates merged: `StreamedPanel`), bins
holding only control probes are dropped and counted (they carry no expression), and the rest
are appended to the section's on-disk counts. Memory follows one band, not the section.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from histmol.binning import BandedBinner
from histmol.counts_store import CountsStore
from platform_adapters._common import GenePanel, StreamedPanel


def banded_units(
    binner: BandedBinner, panel: StreamedPanel, bin_um: float
) -> tuple[pd.DataFrame, GenePanel, int, int]:
    """Units table, gene panel, control-only bins dropped and control hits, from every band.

    Units are the bins holding at least one gene count, in (row, col) order, with ids
    ``bin{bin_um}_{col}_{row}`` and centres in micrometres (bins anchored at (0, 0)).
    """
    n_features = panel.to_genes.shape[0]
    store = CountsStore(0, len(panel.genes))
    cols, rows, controls = [], [], []
    n_bins = n_control_hits = 0
    try:
        for band in binner.bands():
            counts, band_controls = panel.apply(band.counts[:, :n_features])
            n_bins += band.n_bins
            n_control_hits += int(band_controls.sum())
            has_genes = np.flatnonzero(np.diff(counts.indptr) > 0)
            store.append_rows(counts[has_genes])
            cols.append(band.col[has_genes])
            rows.append(band.row[has_genes])
            controls.append(band_controls[has_genes])
    finally:
        binner.close()
    col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    units = pd.DataFrame({
        "unit_id": [f"bin{bin_um:g}_{c}_{r}" for c, r in zip(col, row, strict=True)],
        "x_native": (col + 0.5) * bin_um,
        "y_native": (row + 0.5) * bin_um,
        "bin_col": col.astype(np.int32),
        "bin_row": row.astype(np.int32),
    })
    totals = (np.concatenate(controls) if controls
              else np.zeros((0, len(panel.control_names)), np.int64))
    control_counts = pd.DataFrame(dict(zip(panel.control_names, totals.T, strict=True)))
    gene_panel = GenePanel(panel.genes, store.finish(), control_counts, panel.n_controls)
    return units, gene_panel, n_bins - len(units), n_control_hits
