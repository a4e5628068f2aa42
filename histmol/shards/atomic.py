"""Atomic file and directory writes.

Everything is written under a temporary sibling name and renamed into place with ``os.replace``
(atomic on POSIX within one file system), with fsync of the file before the rename and of the
parent directory after it, so a crash leaves either the old or the new content, never a torn file.
Temporary names start with ``.`` and contain ``.tmp-`` (see ``temp_name``/``is_temp_name``) so
readers skip them and cleanup can recognise them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TEMP_MARK = ".tmp-"
PARQUET_COMPRESSION = "zstd"


def temp_name(name: str) -> str:
    """A unique temporary sibling name for `name`: ``.<name>.tmp-<pid>-<random>``."""
    return f".{name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """True for names made by `temp_name` (and the corpus' staging and trash folders)."""
    return name.startswith(".") and TEMP_MARK in name


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fsync_path(path)
    except OSError:  # some file systems refuse O_RDONLY on directories or fsync on them
        pass


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def naming_path(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an OSError that names no file (ENOSPC from write or fsync) naming `path`.

    The exception keeps its class and errno (callers that catch PermissionError or check
    ``errno.ENOSPC`` still can); its message reads ``[Errno 28] No space left on device:
    'path'``. One without an errno (pyarrow's I/O errors) becomes ``OSError("path: ...")``.
    """
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        if error.errno is not None and type(error).__module__ == "builtins":
            raise type(error)(error.errno, error.strerror or str(error), os.fspath(path)) from error
        raise OSError(f"{os.fspath(path)}: {error}") from error


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` atomically (temp sibling, fsync, rename, fsync parent)."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    try:
        with naming_path(path), open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_dir(path.parent)


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, 2-space indent, trailing newline, UTF-8."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as canonical JSON (sorted keys, no timestamps added) atomically."""
    atomic_write_bytes(path, dumps_json(obj))


def _clean_schema(table: pa.Table) -> pa.Table:
    """Drop schema metadata (pandas adds its version and index layout) so bytes are stable."""
    return table.replace_schema_metadata(None) if table.schema.metadata else table


def write_parquet(path: Path, table: pa.Table) -> None:
    """Write `table` as one row group, zstd-compressed, with no environment-dependent metadata."""
    table = _clean_schema(table)
    pq.write_table(
        table,
        path,
        compression=PARQUET_COMPRESSION,
        row_group_size=max(1, table.num_rows),
    )


def atomic_write_parquet(path: str | os.PathLike[str], table: pa.Table) -> None:
    """Write `table` to `path` atomically as one zstd row group (see `write_parquet`)."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    try:
        with naming_path(path):
            write_parquet(tmp, table)
            fsync_path(tmp)
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_dir(path.parent)


def file_digest(path: Path, *, chunk_size: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def fsync_tree(root: Path) -> None:
    """Call fsync on every file and folder under `root`, deepest first, then `root` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath, name))
        fsync_dir(Path(dirpath))


@contextmanager
def atomic_directory(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder; on success rename it to `path`.

    The body fills the yielded folder. On a clean exit its tree is fsynced (unless the body did so
    and passes ``fsync=False``), it is renamed to `path` and the parent is fsynced. On an exception
    the temporary folder is removed and the exception propagates. `path` must not exist.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists")
    tmp = path.with_name(temp_name(path.name))
    with naming_path(path):
        tmp.mkdir()
    try:
        yield tmp
        with naming_path(path):
            if fsync:
                fsync_tree(tmp)
            os.rename(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_dir(path.parent)
