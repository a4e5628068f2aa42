"""Locks, staging and trash folders of a corpus.

- The corpus lock: an exclusive ``fcntl.flock`` on ``<root>/.lock``, re-entrant per object.
- Staging folders ``shards/.staging-<id>.tmp-<pid>-<token>``: a section's parts are written there
  and renamed to ``shards/<id>`` on commit. Each has a sibling ``<name>.lock`` flocked by its
  owner for as long as the owner lives, so cleanup in another process can tell a live staging
  folder from the debris of a crashed run (the kernel drops the flock when a process dies).
- Trash folders ``shards/.trash-<id>.tmp-...``: an old section folder moved aside during a commit
  or removal, deleted right after; only ever created and deleted under the corpus lock.
All these names start with ``.`` and contain ``.tmp-``.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histmol.shards.atomic import TEMP_MARK, fsync_dir, is_temp_name, remove_path

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LOCK_SUFFIX = ".lock"


def _token() -> str:
    return f"{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


class CorpusLock:
    """Exclusive inter-process lock on a file; re-entrant within one object, thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.RLock()
        self._fd: int | None = None
        self._depth = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the body (blocks until other holders release it)."""
        with self._thread_lock:
            if self._depth == 0:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None


def lock_path_of(staging: Path) -> Path:
    """The owner-lock file beside a staging folder."""
    return staging.with_name(staging.name + LOCK_SUFFIX)


def create_staging(shards_dir: Path, section_id: str) -> tuple[Path, int]:
    """Make a fresh staging folder; return it and the fd of its held owner lock.

    The lock file is created and flocked BEFORE the folder exists, so cleanup never sees an
    unlocked live folder.
    """
    shards_dir.mkdir(exist_ok=True)
    path = shards_dir / f"{STAGING_PREFIX}{section_id}{_token()}"
    fd = os.open(lock_path_of(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path.mkdir()
    except BaseException:
        os.close(fd)
        remove_path(lock_path_of(path))
        raise
    return path, fd


def release_staging(staging: Path, fd: int | None) -> None:
    """Drop a staging folder's owner lock (after its folder was renamed or deleted)."""
    remove_path(lock_path_of(staging))
    if fd is not None:
        os.close(fd)


def remove_if_stale(staging: Path) -> bool:
    """Delete a staging folder (and its lock file) unless a live process holds its lock."""
    lock_path = lock_path_of(staging)
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        remove_path(staging)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live process owns it
        remove_path(staging)
        remove_path(lock_path)
        return True
    finally:
        os.close(fd)


def clean_debris(root: Path, shards_dir: Path, held: set[Path]) -> list[str]:
    """Remove stale staging folders, trash and temporary files; call under the corpus lock.

    `held` are staging folders this process owns (skipped). Temporary files at the root and
    trash folders are only written under the corpus lock, so under it they are always debris.
    Returns the removed names relative to `root`, sorted.
    """
    removed: list[str] = []
    for base in (root, shards_dir):
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            name = entry.name
            if base == shards_dir and name.startswith(STAGING_PREFIX):
                if name.endswith(LOCK_SUFFIX):
                    folder = entry.with_name(name[: -len(LOCK_SUFFIX)])
                    if (not entry.exists() or folder.exists() or folder in held
                            or not remove_if_stale(folder)):
                        continue
                elif entry in held or not remove_if_stale(entry):
                    continue
            elif not is_temp_name(name):
                continue
            else:
                remove_path(entry)
            removed.append(str(entry.relative_to(root)))
    return sorted(removed)


def move_to_trash(folder: Path) -> Path | None:
    """Rename `folder` to a trash sibling (None if it does not exist); delete that later."""
    if not folder.exists():
        return None
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}{_token()}")
    os.rename(folder, trash)
    fsync_dir(folder.parent)
    return trash
