"""Whole batches from a PairDataset (``batched=True``): what a DataLoader would collate, made early.

A DataLoader collects a worker's samples ``batch_size`` at a time; `iter_batches` groups the same
samples the same way (skipped corrupt samples included), so batched and per-sample iteration
give identical batches, order and resume states. With uint8 patches and no `patch_transform`
each JPEG is decoded straight into its row of the batch (``ShardReader.read_patch(i, out=row)``,
i.e. ``imagecodecs.jpeg8_decode(data, out=row)``; https://github.com/cgohlke/imagecodecs):
no per-sample array and no stacking copy. In a DataLoader worker the rows live in a reusable
shared buffer (`histmol.data.shm`); in the main process (or where there is no memfd, i.e. not
Linux) in a fresh array, which torch's pickling copies into shared memory. Other settings decode
per sample and collate with `pair_collate`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from histmol.data.collate import pair_collate
from histmol.data.shm import BufferPool
from histmol.errors import CorpusError

if TYPE_CHECKING:
    from histmol.data.dataset import PairDataset


class _Rows:
    """The patch rows of the batch being filled: a pool buffer in a worker, else a new array."""

    def __init__(self, ds: PairDataset, shape: tuple[int, int, int]) -> None:
        full = (ds.batch_size, *shape)
        if get_worker_info() is None or not hasattr(os, "memfd_create"):  # memfd: Linux only
            self.buffer, self.array = None, np.empty(full, np.uint8)
        else:
            if ds._pool is None or ds._pool.shape != full:
                ds._pool = BufferPool(full)
            self.buffer = ds._pool.take()
            self.array = self.buffer.array

    def patches(self, n: int) -> Any:
        """Return the first `n` rows: a tensor, or in a worker a LeasedPatches arriving as one."""
        if self.buffer is None:
            return torch.from_numpy(self.array[:n])
        return self.buffer.lease(n)


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
    fields: list[dict[str, Any]] = []
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
            open_part.reader.read_patch(pair, out=rows.array[len(fields)])
        except CorpusError as error:
            ds._read_failed(part, error)
            ds.skipped_samples += 1
            continue
        fields.append(ds._fields(part, open_part, pair, index))
        if len(fields) == ds.batch_size:
            yield {"patch": rows.patches(len(fields)), **pair_collate(fields)}
            rows, fields = None, []
    if fields:
        assert rows is not None
        yield {"patch": rows.patches(len(fields)), **pair_collate(fields)}
