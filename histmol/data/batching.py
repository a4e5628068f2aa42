"""Whole batches from a PairDataset (``batched=True``): what a DataLoader would collate, made early.

A DataLoader collects a worker's samples ``batch_size`` at a time; `iter_batches` groups the same
samples the same way (skipped corrupt samples included), so batched and per-sample iteration
give identical batches, order and resume states. With uint8 patches and no `patch_transform`
each JPEG is decoded straight into its row of the batch (``ShardReader.read_patch(i, out=row)``,
i.e. ``imagecodecs.jpeg8_decode(data, out=row)``; https://github.com/cgohlke/imagecodecs):
no per-sample array and no stacking copy. In a DataLoader worker the rows, and the batch's other
arrays, live in reusable shared buffers (`histmol.data.shm`); in the main process (or where
there is no memfd, i.e. not Linux) in fresh arrays, which torch's pickling copies into shared
memory. Other settings decode per sample and collate with `pair_collate`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from histmol.data.collate import pair_collate
from histmol.data.part import PartUnits, ragged_arange
from histmol.data.shm import BufferPool, SharedBuffer
from histmol.errors import CorpusError
from histmol.shards.jpeg import misaligned_empty

if TYPE_CHECKING:
    from histmol.data.dataset import PairDataset


def _shared(ds: PairDataset, kind: str, capacity: int) -> SharedBuffer | None:
    """A free pooled buffer of the worker's `kind` pool; None outside a worker or without memfd."""
    if get_worker_info() is None or not hasattr(os, "memfd_create"):  # memfd: Linux only
        return None
    if ds._pools is None:
        ds._pools = {}
    pool = ds._pools.setdefault(kind, BufferPool())
    return pool.take(capacity)


class _Rows:
    """The patch rows of the batch being filled: a pool buffer in a worker, else a new array."""

    def __init__(self, ds: PairDataset, shape: tuple[int, int, int]) -> None:
        full = (ds.batch_size, *shape)
        self.buffer = _shared(ds, "patches", int(np.prod(full)))
        if self.buffer is None:
            self.array = misaligned_empty(full)
        else:
            self.array = self.buffer.view(0, np.dtype(np.uint8), full)

    def patches(self, n: int) -> Any:
        """Return the first `n` rows: a tensor, or in a worker a LeasedArray arriving as one."""
        if self.buffer is None:
            return torch.from_numpy(self.array[:n])
        return self.buffer.lease([(0, 0, np.uint8, (n, *self.array.shape[1:]))])[0]


class _Arrays:
    """The batch's other arrays, by name: views of a pooled buffer in a worker, else new arrays."""

    ALIGN = 64

    def __init__(self, ds: PairDataset, specs: dict[str, tuple[Any, tuple[int, ...]]]) -> None:
        self.layout: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        end = 0
        for name, (dtype, shape) in specs.items():
            self.layout[name] = (end, np.dtype(dtype), shape)
            size = np.dtype(dtype).itemsize * int(np.prod(shape))
            end += -(-size // self.ALIGN) * self.ALIGN
        # a little headroom: the next batches' unit counts vary, a buffer should fit them too
        self.buffer = _shared(ds, "fields", end + end // 4)
        if self.buffer is None:
            self.arrays = {name: np.empty(shape, dtype)
                           for name, (_, dtype, shape) in self.layout.items()}
        else:
            self.arrays = {name: self.buffer.view(offset, dtype, shape)
                           for name, (offset, dtype, shape) in self.layout.items()}

    def out(self) -> dict[str, Any]:
        """The arrays to put in the batch: tensors, or in a worker LeasedArrays arriving as ones."""
        if self.buffer is None:
            return {name: torch.from_numpy(array) for name, array in self.arrays.items()}
        specs = [(flag, *spec) for flag, spec in enumerate(self.layout.values())]
        return dict(zip(self.layout, self.buffer.lease(specs), strict=True))


def iter_batches(ds: PairDataset, indices: Iterator[int],
                 progress: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Batches of `ds.batch_size` samples of `indices` (the last may be short), as pair_collate."""
    if ds.patch_format != "uint8_hwc" or ds.patch_transform is not None:
        samples = []
        for index in indices:
            progress["position"] += 1
            sample = ds._sample(index)
            if sample is None:
                ds.skipped_samples += 1
                continue
            samples.append(sample)
            if len(samples) == ds.batch_size:
                yield pair_collate(samples)
                samples = []
        if samples:
            yield pair_collate(samples)
        return
    rows: _Rows | None = None
    batch = _Sources()
    for index in indices:
        progress["position"] += 1
        located = ds._locate(index)
        if located is None:
            ds.skipped_samples += 1
            continue
        part, open_part, pair = located
        if rows is None:
            rows = _Rows(ds, open_part.reader.shape[1:])
        try:
            open_part.reader.read_patch(pair, out=rows.array[len(batch.indices)])
        except CorpusError as error:
            ds._read_failed(part, error)
            ds.skipped_samples += 1
            continue
        batch.add(part, open_part.units, pair, index)
        if len(batch.indices) == ds.batch_size:
            yield {"patch": rows.patches(ds.batch_size), **batch_fields(ds, batch)}
            rows, batch = None, _Sources()
    if batch.indices:
        assert rows is not None
        yield {"patch": rows.patches(len(batch.indices)), **batch_fields(ds, batch)}


class _Sources:
    """Where each sample of the batch being filled comes from: part, its units, pair, index."""

    def __init__(self) -> None:
        self.parts: list[int] = []
        self.pairs: list[int] = []
        self.indices: list[int] = []
        self.units: dict[int, PartUnits] = {}  # held here: the part may close before the batch

    def add(self, part: int, units: PartUnits, pair: int, index: int) -> None:
        self.parts.append(part)
        self.pairs.append(pair)
        self.indices.append(index)
        self.units[part] = units


def batch_fields(ds: PairDataset, batch: _Sources) -> dict[str, Any]:
    """Every field but the patch, laid out as `pair_collate` lays out `PairDataset._fields`.

    Built with a few numpy operations per part in the batch rather than per sample (per-sample
    fields and their collation cost ~10 % of a worker's time next to the JPEG decode), straight
    into a pooled shared buffer in a worker.
    """
    parts, pairs = np.asarray(batch.parts), np.asarray(batch.pairs, dtype=np.int64)
    n, n_genes, aggregate = len(parts), len(ds.gene_set), ds.aggregate_units
    groups = [(units, np.flatnonzero(parts == part)) for part, units in batch.units.items()]
    unit_ids, n_units = [], np.empty(n, np.int64)
    for units, samples in groups:
        ids, n_units[samples] = units.units_of(pairs[samples])
        unit_ids.append(ids)
    total = int(n_units.sum())
    specs: dict[str, tuple[Any, tuple[int, ...]]] = {
        "expression": (np.float32, (n if aggregate else total, n_genes)),
        "n_units": (np.int64, (n,)), "panel_mask": (np.bool_, (n, n_genes)),
        "index": (np.int64, (n,)), "pair_index": (np.int64, (n,)), "part": (np.int64, (n,)),
        "corpus": (np.int64, (n,)),
    }
    if not aggregate:
        specs.update(positions=(np.float32, (total, 2)), unit_batch=(np.int64, (total,)))
    arrays = _Arrays(ds, specs)
    out = arrays.arrays
    out["expression"].fill(0)
    first_row = np.cumsum(n_units) - n_units
    for (units, samples), ids in zip(groups, unit_ids, strict=True):
        rows = ragged_arange(first_row[samples], n_units[samples])  # batch rows of these units
        sample_rows = np.repeat(samples, n_units[samples])
        units.fill_expression(ids, sample_rows if aggregate else rows, out["expression"],
                              aggregate)
        if not aggregate:
            out["positions"][rows, 0], out["positions"][rows, 1] = units.x[ids], units.y[ids]
    meta = [ds._meta[part] for part in batch.parts]
    out["n_units"][:] = n_units
    np.stack([m[4] for m in meta], out=out["panel_mask"])
    out["index"][:] = batch.indices
    out["pair_index"][:] = pairs
    out["part"][:] = [ds.parts[part].part for part in batch.parts]
    out["corpus"][:] = [m[3] for m in meta]
    if not aggregate:
        out["unit_batch"][:] = np.repeat(np.arange(n), n_units)
    sent = arrays.out()
    fields = {name: sent[name] for name in
              ("expression", "n_units", "panel_mask", "index", "pair_index", "part")}
    fields.update(section_id=[m[0] for m in meta], platform=[m[1] for m in meta],
                  tissue=[m[2] for m in meta], corpus=sent["corpus"])
    if not aggregate:
        fields.update(positions=sent["positions"], unit_batch=sent["unit_batch"])
    return fields
