"""Decoded units of corpus parts, decoded once per machine and shared by every loader process.

Why: a part's units parquet is zstd-compressed lists; decoding it costs ~7 ms for a 2,048-pair
spot part and ~180 ms for a 613-pair 8 um Visium HD part (~290 us a pair: more than decoding the
pair's JPEG). The epoch order spreads every part over all DataLoader workers, so without sharing
each of W workers decodes each part it touches: W times the work, every epoch.

The first process to need a part decodes it and writes the checked columns as an uncompressed
Arrow IPC file (https://arrow.apache.org/docs/python/ipc.html); every process then memory-maps
that file, zero copy, so its pages are shared through the page cache. Layout:
``<root>/<key>.arrow`` (the caller's key names the exact, checked file version), written as
``<key>.arrow.tmp`` and renamed into place while holding a flock on ``<key>.lock``
(`histmol.shards.staging.CorpusLock`): concurrent workers wait for one decode instead of
repeating it, and a crash leaves at most a temporary file that the next build of that key
overwrites (the kernel drops the lock with the process). Opening an entry refreshes its mtime;
after each write the least recently used files are removed until the folder holds at most
`max_bytes` (a removed file stays readable to those that mapped it). An entry that cannot be
read is rebuilt; a cache that cannot be written (full or read-only disk) only costs the decode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from histmol.shards.staging import CorpusLock

SUFFIX, TMP_SUFFIX, LOCK_SUFFIX = ".arrow", ".arrow.tmp", ".lock"
ENTRY_FORMAT = 2  # bump when the stored columns change: older entries are never looked up again


def entry_key(*identity: object) -> str:
    """The key of an entry: a hash of everything that determines its content (JSON values)."""
    return hashlib.sha256(json.dumps([ENTRY_FORMAT, *identity]).encode()).hexdigest()[:32]


def _read(path: Path) -> pa.Table:
    """Memory-map an entry and return its table (zero copy: buffers point into the mapping)."""
    with pa.ipc.open_file(pa.memory_map(str(path))) as reader:
        return reader.read_all()


class UnitsCache:
    """Decoded unit tables by key in one folder, at most `max_bytes` on disk (see module doc)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes

    def table(self, key: str, decode: Callable[[], pa.Table]) -> pa.Table:
        """The table stored under `key`, decoding and storing it with `decode()` when absent.

        `decode` must return a table whose columns are single contiguous chunks, and raise for
        bad input (its errors propagate; nothing is stored then).
        """
        path = self.root / f"{key}{SUFFIX}"
        table = self._open(path)
        if table is not None:
            return table
        decoded: pa.Table | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with CorpusLock(self.root / f"{key}{LOCK_SUFFIX}").hold():
                table = self._open(path)  # another process may have built it meanwhile
                if table is not None:
                    return table
                decoded = decode()
                tmp = self.root / f"{key}{TMP_SUFFIX}"
                with pa.OSFile(str(tmp), "wb") as sink, \
                        pa.ipc.new_file(sink, decoded.schema) as writer:
                    writer.write_table(decoded)
                os.replace(tmp, path)
            self._evict(keep=path)
            return _read(path)
        except OSError:  # an unwritable cache (full or read-only disk) only costs the decode
            return decoded if decoded is not None else decode()

    @staticmethod
    def _open(path: Path) -> pa.Table | None:
        try:
            table = _read(path)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowInvalid):  # unreadable: drop it, it is rebuilt
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):  # least recently used goes first (read-only: no LRU)
            os.utime(path)
        return table

    def _evict(self, keep: Path) -> None:
        """Remove least recently used files until the folder holds at most `max_bytes`."""
        files = []
        for entry in os.scandir(self.root):
            with contextlib.suppress(OSError):
                stat = entry.stat()
                if not entry.name.endswith(LOCK_SUFFIX):
                    files.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                if path.name.endswith(SUFFIX):
                    (path.parent / f"{path.name[:-len(SUFFIX)]}{LOCK_SUFFIX}").unlink(
                        missing_ok=True)
