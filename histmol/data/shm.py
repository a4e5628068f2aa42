"""Reusable shared-memory patch buffers: a DataLoader worker decodes a batch straight into one.

Why: a worker that stacks decoded patches into a fresh shared storage per batch (what
``default_collate`` and torch's tensor pickling do) pays for a new 38 MB tmpfs file every step
(256 x 224 x 224 x 3): ``posix_fallocate`` zeroes it (~8 ms), every page faults on first touch
and is freed again in the main process. On the 2-core development machine, decoding 256 of the
benchmark corpus' JPEGs into a fresh shared storage took ~93 ms (best of 8) against ~55 ms into
reused memory; benchmarks/bench_loader.py compares the two loader modes end to end.

A `PatchBuffer` is an anonymous ``memfd`` (``os.memfd_create``: no name in /dev/shm, freed by the
kernel when the last descriptor or mapping of it goes, so a crash leaves nothing behind) holding
a one-byte header and a (B, H, W, 3) uint8 array. `BufferPool` (one per worker, built in the
worker) hands out a buffer only when its header says no receiver holds it any longer, else it
makes a new one. A `LeasedPatches` travels through the DataLoader's queue by pickling: the main
process maps the same memory (``_receive``) and gets a plain uint8 tensor over it; a
``weakref.finalize`` on the array under that tensor clears the header once the tensor's storage
is freed (every view, numpy alias and the pin-memory copy's source included), and only then may
the worker write into the buffer again. A batch handed to the user is therefore never
overwritten while any tensor over it is alive. (The flag is one byte written after the tensor
is freed and read before the worker writes; CPython's GIL hand-offs between the two are full
memory barriers in practice.) File descriptors cross processes the way torch
shares storages (``multiprocessing.reduction.DupFd``,
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

HEADER = 64  # byte 0: 1 while a receiver may hold the buffer, 0 when free; the rest is padding
_FREE, _HELD = 0, 1


def _view(mm: mmap.mmap, shape: tuple[int, ...]) -> np.ndarray:
    """Return the (n, H, W, 3) uint8 array after the header of a mapped buffer."""
    return np.frombuffer(mm, np.uint8, int(np.prod(shape)), HEADER).reshape(shape)


class PatchBuffer:
    """One shared (capacity, H, W, 3) uint8 array in an anonymous memfd, with a held flag."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        self.shape = shape
        self.nbytes = HEADER + int(np.prod(shape))
        fd = os.memfd_create("histmol-patches", os.MFD_CLOEXEC)
        try:  # reserve the pages now: a full memory limit fails here, not as SIGBUS on write
            os.posix_fallocate(fd, 0, self.nbytes)
            self.mm = mmap.mmap(fd, self.nbytes)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        self.array = _view(self.mm, shape)

    @property
    def held(self) -> bool:
        """True while a receiver may still hold a tensor over this buffer."""
        return self.mm[0] != _FREE

    def lease(self, n: int) -> LeasedPatches:
        """Mark the buffer held and wrap its first `n` patches for sending."""
        self.mm[0] = _HELD
        return LeasedPatches(self, n)


class LeasedPatches:
    """Patches ``[:n]`` of a PatchBuffer on their way out of a worker.

    Pickled, it arrives as a (n, H, W, 3) uint8 tensor sharing the buffer (see the module
    docstring). One that is never pickled frees its buffer when it is garbage collected.
    """

    def __init__(self, buffer: PatchBuffer, n: int) -> None:
        self.buffer, self.shape = buffer, (n, *buffer.shape[1:])
        self._sent = False

    def tensor(self) -> torch.Tensor:
        """Return the patches as a tensor, for use inside the worker (shares the buffer)."""
        return torch.from_numpy(self.buffer.array[:self.shape[0]])

    def __reduce__(self) -> tuple[Any, ...]:
        self._sent = True
        return _receive, (DupFd(self.buffer.fd), self.buffer.nbytes, self.shape)

    def __del__(self) -> None:
        if not self._sent and not self.buffer.mm.closed:
            self.buffer.mm[0] = _FREE


def _release(mm: mmap.mmap) -> None:
    """Mark the buffer free once the receiver's tensor is gone: the worker may reuse it."""
    mm[0] = _FREE


def _receive(fd: Any, nbytes: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Map a sent buffer and return its patches as a tensor that frees the buffer when freed."""
    raw = fd.detach()
    try:
        mm = mmap.mmap(raw, nbytes)
    finally:
        os.close(raw)
    array = _view(mm, shape)
    weakref.finalize(array, _release, mm)
    return torch.from_numpy(array)


class BufferPool:
    """A worker's PatchBuffers: reuses a released one, else makes one (keeping at most `keep`)."""

    def __init__(self, shape: tuple[int, int, int, int], keep: int = 8) -> None:
        self.shape, self.keep = shape, keep
        self.buffers: list[PatchBuffer] = []
        self.created = 0

    def take(self) -> PatchBuffer:
        """Return a buffer no receiver holds: a free one reused, else a new one."""
        for buffer in self.buffers:
            if not buffer.held:
                return buffer
        buffer = PatchBuffer(self.shape)
        self.created += 1
        if len(self.buffers) < self.keep:
            self.buffers.append(buffer)
        return buffer
