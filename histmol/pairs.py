"""Turn a registered, planned section into per-pair unit tables (what the shard writer stores)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from histmol.config import BuildConfig
from histmol.registration import Registration
from histmol.section import Section
from histmol.tiling import PatchPlan


def pair_counts(section: Section, rows: np.ndarray, gene_index: np.ndarray) -> sp.csr_matrix:
    """The section's counts of the units at `rows`, columns renumbered to vocabulary indices.

    Done per pair rather than for the whole matrix so that no full-size copy of a dense
    platform's counts is ever made (a `CountsStore` section is only ever read pair by pair).
    """
    block = section.count_rows(rows)
    renumbered = sp.csr_matrix(
        (block.data.astype(np.int32), gene_index[block.indices].astype(np.int32), block.indptr),
        shape=(len(rows), int(gene_index.max()) + 1 if len(gene_index) else 0),
    )
    renumbered.eliminate_zeros()
    renumbered.sort_indices()
    return renumbered


def unit_tables(
    section: Section,
    registration: Registration,
    plan: PatchPlan,
    pair_tissue: np.ndarray,
    gene_index: np.ndarray,
    config: BuildConfig,
) -> Iterator[pa.Table]:
    """Yield, for each pair in order, the Arrow table of the units it holds.

    Columns say their frame (DESIGN.md): unit centre in WSI level-0 px and in um, the patch's
    top-left in level-0 px, the centre inside the patch in patch px; raw counts as sparse lists
    indexed into the corpus vocabulary; control-probe totals kept as QC columns.
    """
    kept = np.flatnonzero(plan.unit_pair >= 0)
    order = kept[np.argsort(plan.unit_pair[kept], kind="stable")]
    pair_of = plan.unit_pair[order]
    bounds = np.searchsorted(pair_of, np.arange(plan.n_pairs + 1))
    scale = registration.mpp / config.target_mpp
    patch_x0 = plan.x0[pair_of]
    patch_y0 = plan.y0[pair_of]
    x_wsi = registration.x_wsi_px[order]
    y_wsi = registration.y_wsi_px[order]
    columns: dict[str, np.ndarray] = {
        "unit_id": section.units["unit_id"].astype(str).to_numpy()[order],
        "x_wsi_px": x_wsi,
        "y_wsi_px": y_wsi,
        "x_um": x_wsi * registration.mpp,
        "y_um": y_wsi * registration.mpp,
        "patch_x0_wsi_px": patch_x0,
        "patch_y0_wsi_px": patch_y0,
        "x_in_patch_px": ((x_wsi - patch_x0) * scale).astype(np.float32),
        "y_in_patch_px": ((y_wsi - patch_y0) * scale).astype(np.float32),
        "tissue_fraction": pair_tissue[pair_of].astype(np.float32),
        "total_counts": section.unit_totals()[order],
    }
    for category in section.control_counts.columns:
        columns[f"control_{category}"] = section.control_counts[category].to_numpy(np.int64)[order]
    for pair in range(plan.n_pairs):
        start, stop = int(bounds[pair]), int(bounds[pair + 1])
        arrays = {name: pa.array(values[start:stop]) for name, values in columns.items()}
        block = pair_counts(section, order[start:stop], gene_index)
        offsets = pa.array(block.indptr.astype(np.int32))
        arrays["gene_idx"] = pa.ListArray.from_arrays(offsets, pa.array(block.indices))
        arrays["counts"] = pa.ListArray.from_arrays(offsets, pa.array(block.data))
        yield pa.table(arrays)
