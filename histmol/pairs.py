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

BATCH_UNITS = 1 << 14  # units whose columns are built at once (see unit_tables)


def pair_counts(section: Section, rows: np.ndarray, gene_index: np.ndarray) -> sp.csr_matrix:
    """The section's counts of the units at `rows`, columns renumbered to vocabulary indices.

    Done per batch of pairs rather than for the whole matrix so that no full-size copy of a
    dense platform's counts is ever made (a `CountsStore` section is only read a batch at a time).
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
    bounds = np.searchsorted(plan.unit_pair[order], np.arange(plan.n_pairs + 1))
    scale = registration.mpp / config.target_mpp
    ids = section.units["unit_id"]  # Arrow strings for dense platforms: no Python str per unit
    unit_ids = pa.chunked_array(
        pa.array(ids.astype(str) if ids.dtype == object else ids, type=pa.string())
    ).combine_chunks()
    controls = {f"control_{c}": section.control_counts[c].to_numpy(np.int64)
                for c in section.control_counts.columns}
    # Columns are built a batch of whole pairs at a time and each pair's table is a zero-copy
    # slice of its batch: per-pair numpy/scipy/Arrow calls cost more than the work in spot mode
    # (one unit per pair), while batches of BATCH_UNITS keep a 2 um section's copies small.
    first = 0
    while first < plan.n_pairs:
        limit = bounds[first] + BATCH_UNITS
        last = max(first + 1, int(np.searchsorted(bounds, limit, "right")) - 1)
        table = _batch_table(
            section, registration, plan, pair_tissue, gene_index, scale, unit_ids, controls,
            order[bounds[first] : bounds[last]], first, last, np.diff(bounds[first : last + 1]),
        )
        for pair in range(first, last):
            yield table.slice(bounds[pair] - bounds[first], bounds[pair + 1] - bounds[pair])
        first = last


def _batch_table(
    section: Section,
    registration: Registration,
    plan: PatchPlan,
    pair_tissue: np.ndarray,
    gene_index: np.ndarray,
    scale: float,
    unit_ids: pa.Array,
    controls: dict[str, np.ndarray],
    rows: np.ndarray,
    first: int,
    last: int,
    sizes: np.ndarray,
) -> pa.Table:
    """The units of pairs `first`..`last - 1` (section rows `rows`, `sizes` per pair), in order."""
    x_wsi, y_wsi = registration.x_wsi_px[rows], registration.y_wsi_px[rows]
    patch_x0 = np.repeat(plan.x0[first:last], sizes)
    patch_y0 = np.repeat(plan.y0[first:last], sizes)
    block = pair_counts(section, rows, gene_index)
    columns: dict[str, np.ndarray | pa.Array] = {
        "unit_id": unit_ids.take(rows),
        "x_wsi_px": x_wsi,
        "y_wsi_px": y_wsi,
        "x_um": x_wsi * registration.mpp,
        "y_um": y_wsi * registration.mpp,
        "patch_x0_wsi_px": patch_x0,
        "patch_y0_wsi_px": patch_y0,
        "x_in_patch_px": ((x_wsi - patch_x0) * scale).astype(np.float32),
        "y_in_patch_px": ((y_wsi - patch_y0) * scale).astype(np.float32),
        "tissue_fraction": np.repeat(np.asarray(pair_tissue[first:last], np.float32), sizes),
        "total_counts": np.asarray(block.sum(axis=1, dtype=np.int64)).ravel(),
        **{name: values[rows] for name, values in controls.items()},
    }
    arrays = {name: values if isinstance(values, pa.Array) else pa.array(values)
              for name, values in columns.items()}
    offsets = pa.array(block.indptr.astype(np.int32))
    arrays["gene_idx"] = pa.ListArray.from_arrays(offsets, pa.array(block.indices))
    arrays["counts"] = pa.ListArray.from_arrays(offsets, pa.array(block.data))
    return pa.table(arrays)
