"""Reusable shared-memory batch buffers: a DataLoader worker builds a batch straight into them.

Why: a worker that stacks decoded patches into a fresh shared storage per batch (what
``default_collate`` and torch's tensor pickling do) pays for a new 38 MB tmpfs file every step
(256 x 224 x 224 x 3): ``posix_fallocate`` zeroes it (~8 ms), every page faults on first touch
and is freed again in the main process. On the 2-core development machine, decoding 256 of the
benchmark corpus' JPEGs into a fresh shared storage took ~93 ms (best of 8) against ~55 ms into
reused memory. The batch's other arrays (expression, panel mask, ids: ~2.6 MB at 2,000 genes)
cost the same way ~2 ms a batch to pickle into fresh shared memory; sending none of them made
the 2-worker loader ~8 % faster, so they get a pooled buffer too.
benchmarks/bench_loader.py compares the loader modes end to end.

A `SharedBuffer` is an anonymous ``memfd`` (``os.memfd_create``: no name in /dev/shm, freed by the
kernel when the last descriptor or mapping of it goes, so a crash leaves nothing behind): a
header of `FLAGS` one-byte flags, then the data, which starts 16 bytes past a 32-byte boundary
(see `histmol.shards.jpeg.ROW_ALIGNMENT` for why). Arrays inside it are sent as `LeasedArray`
objects, each with a flag of its own: pickled through the DataLoader's queue, one arrives in the
main process as a plain tensor over the same memory (``_receive``), and a ``weakref.finalize``
on the array under that tensor clears its flag once the tensor's storage is freed (every view,
numpy alias and the pin-memory copy's source included). `BufferPool` (one per worker and kind
of buffer, built in the worker) hands out a buffer only when all its flags are clear, else makes
a new one. A batch handed to the user is therefore never overwritten while any tensor over it
is alive. (A flag is one byte written after the tensor is freed and read before the worker
writes; CPython's GIL hand-offs between the two are full memory barriers in practice, and each
flag has one writer on each side.) File descriptors cross processes the way torch shares storages
(``multiprocessing.reduction.DupFd``,
https://docs.python.org/3/library/multiprocessing.html#module-multiprocessing.reduction).
"""

from __future__ import annotations

import mmap
import os
import weakref
from multiprocessing.reduction import DupFd
from typing import Any

import numpy as np
import torch

from histmol.shards.jpeg import ROW_OFFSET

FLAGS = 64  # header bytes: flag i is 1 while the receiver of leased array i may hold it
HEADER = FLAGS + ROW_OFFSET  # a mapping is page-aligned: the data starts ROW_OFFSET past 32
_FREE, _HELD = 0, 1
_ALL_FREE = bytes(FLAGS)


class SharedBuffer:
    """`capacity` bytes of shared data in an anonymous memfd, after a header of flags."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.nbytes = HEADER + capacity
        fd = os.memfd_create("histmol-batch", os.MFD_CLOEXEC)
        try:  # reserve the pages now: a full memory limit fails here, not as SIGBUS on write
            os.posix_fallocate(fd, 0, self.nbytes)
            self.mm = mmap.mmap(fd, self.nbytes)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        """True while a receiver may still hold a tensor over any array of this buffer."""
        return self.mm[:FLAGS] != _ALL_FREE

    def view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The array of `dtype` and `shape` at data byte `offset` (a view of the buffer)."""
        return _view(self.mm, HEADER + offset, dtype, shape)

    def lease(self, specs: list[tuple[int, int, Any, tuple[int, ...]]]) -> list[LeasedArray]:
        """Mark flags held and wrap arrays for sending: per spec (flag, offset, dtype, shape).

        The arrays share one `_Mapping`, so a batch pickled whole passes this buffer's file
        descriptor once (the pickler's memo), however many of its arrays the batch holds.
        """
        mapping = _Mapping(self)
        leases = []
        for flag, offset, dtype, shape in specs:
            self.mm[flag] = _HELD
            leases.append(LeasedArray(mapping, flag, offset, np.dtype(dtype), tuple(shape)))
        return leases


class _Mapping:
    """A SharedBuffer as sent: arrives as one ``mmap`` of the same memory in the receiver."""

    def __init__(self, buffer: SharedBuffer) -> None:
        self.buffer = buffer

    def __reduce__(self) -> tuple[Any, ...]:
        return _map, (DupFd(self.buffer.fd), self.buffer.nbytes)


def _map(fd: Any, nbytes: int) -> mmap.mmap:
    raw = fd.detach()
    try:
        return mmap.mmap(raw, nbytes)
    finally:
        os.close(raw)


def _view(mm: mmap.mmap, start: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(mm, dtype, int(np.prod(shape)), start).reshape(shape)


class LeasedArray:
    """An array of a SharedBuffer on its way out of a worker, holding the buffer's flag `flag`.

    Pickled, it arrives as a tensor sharing the buffer (see the module docstring). One that is
    never pickled clears its flag when it is garbage collected.
    """

    def __init__(self, mapping: _Mapping, flag: int, offset: int, dtype: np.dtype,
                 shape: tuple[int, ...]) -> None:
        self.mapping, self.flag, self.offset = mapping, flag, offset
        self.dtype, self.shape = dtype, shape
        self._sent = False

    def tensor(self) -> torch.Tensor:
        """Return the array as a tensor, for use inside the worker (shares the buffer)."""
        return torch.from_numpy(self.mapping.buffer.view(self.offset, self.dtype, self.shape))

    def __reduce__(self) -> tuple[Any, ...]:
        self._sent = True
        return _receive, (self.mapping, self.flag, HEADER + self.offset, self.dtype.str,
                          self.shape)

    def __del__(self) -> None:
        mm = self.mapping.buffer.mm
        if not self._sent and not mm.closed:
            mm[self.flag] = _FREE


def _release(mm: mmap.mmap, flag: int) -> None:
    """Clear a flag once the receiver's tensor is gone: the worker may reuse the buffer."""
    mm[flag] = _FREE


def _receive(mm: mmap.mmap, flag: int, start: int, dtype: str,
             shape: tuple[int, ...]) -> torch.Tensor:
    """Return a sent array as a tensor over the mapped buffer that clears its flag when freed."""
    array = _view(mm, start, np.dtype(dtype), shape)
    weakref.finalize(array, _release, mm, flag)
    return torch.from_numpy(array)


class BufferPool:
    """A worker's SharedBuffers of one kind: reuses a free one that is big enough, else makes one.

    Keeps at most `keep` buffers; a new buffer replaces the smallest free one when full.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.buffers: list[SharedBuffer] = []
        self.created = 0

    def take(self, capacity: int) -> SharedBuffer:
        """Return a buffer of at least `capacity` bytes that no receiver holds."""
        free = [b for b in self.buffers if not b.held]
        fitting = [b for b in free if b.capacity >= capacity]
        if fitting:
            return min(fitting, key=lambda b: b.capacity)
        buffer = SharedBuffer(capacity)
        self.created += 1
        if len(self.buffers) >= self.keep and free:
            self.buffers.remove(min(free, key=lambda b: b.capacity))
        if len(self.buffers) < self.keep:
            self.buffers.append(buffer)
        return buffer
