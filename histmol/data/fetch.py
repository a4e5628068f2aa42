"""Locate a part's files on local disk and check them against the manifest.

A local corpus is read in place. A part of a remote corpus (any non-local fsspec file system) is
copied once into ``<cache_dir>/<sha256(url)[:16]>/`` under its corpus-relative path: streamed into
a temporary sibling (``histmol.shards.atomic.temp_name``), hashed on the way, checked and renamed
into place, so a crash leaves only a temporary name behind and concurrent workers at worst fetch
the same part twice. Nothing is shared between processes but these files.

Checks follow the manifest (``histmol.shards.corpus``): ``images_bytes``/``images_sha256`` cover
the shard file's bytes followed by the part's ``zarr.json``; ``units_bytes``/``units_sha256`` the
units parquet. ``verify="size"`` checks lengths only (no hashing), ``"sha256"`` both. A part's
images are hashed once per machine and file version (``<cache_dir>/verified/`` markers, see
`check_images`); its units parquet (~2 MB) is read whole and hashed in every process.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from histmol.data.source import CorpusSource, PartRef
from histmol.errors import CorpusError
from histmol.shards.atomic import remove_path, temp_name
from histmol.shards.shard_reader import SHARD_CHUNK_COORDS, chunk_key

Verify = Literal["sha256", "size"]
VERIFY_MODES = ("sha256", "size")
_BLOCK = 1 << 20


def shard_key(zarr_json: bytes, where: str) -> str:
    """The shard file's key inside a part folder, from the part's zarr.json bytes."""
    try:
        return chunk_key(json.loads(zarr_json)["chunk_key_encoding"], SHARD_CHUNK_COORDS)
    except (ValueError, KeyError, TypeError) as error:
        raise CorpusError(f"{where}/zarr.json: unexpected part metadata ({error})") from error


def mismatch(where: str, what: str, expected: object, found: object) -> CorpusError:
    """The error for a part that disagrees with the manifest."""
    return CorpusError(
        f"{where}: {what} {found} disagrees with the manifest ({expected}): the shard is corrupt, "
        "truncated or was replaced after the manifest was written"
    )


def check_bytes(data: bytes, expected_bytes: int, expected_sha: str, verify: Verify,
                where: str) -> None:
    """Check an in-memory file against the manifest's length and sha256."""
    if len(data) != expected_bytes:
        raise mismatch(where, "length", expected_bytes, len(data))
    if verify == "sha256":
        found = hashlib.sha256(data).hexdigest()
        if found != expected_sha:
            raise mismatch(where, "sha256", expected_sha, found)


def _hash_file(path: Path, digest: hashlib._Hash) -> int:
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return size


def _signature(path: Path) -> str:
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def _marker(part_dir: Path, shard: Path, ref: PartRef, verify: Verify, markers: Path) -> Path:
    """The marker file vouching for this exact version of a part's files."""
    signature = f"{_signature(shard)}|{_signature(part_dir / 'zarr.json')}"
    name = f"{signature}|{ref.images_bytes}|{ref.images_sha256}|{verify}"
    return markers / hashlib.sha256(name.encode()).hexdigest()[:32]


def _touch(marker: Path) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache only costs a re-check
        pass


def check_images(part_dir: Path, ref: PartRef, verify: Verify, where: str,
                 markers: Path | None = None) -> None:
    """Check a local part folder (shard file + zarr.json) against the manifest.

    With `markers`, a part already checked on this machine (same files: path, size, mtime and
    inode; same expected sha256) is not hashed again: a successful check leaves an empty marker
    file named after that signature. Markers are plain files, so a crash leaves nothing stale:
    a marker only ever vouches for the exact file version it was made for.
    """
    try:
        zarr_json = (part_dir / "zarr.json").read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"{where}/zarr.json: missing") from None
    shard = part_dir / shard_key(zarr_json, where)
    try:
        marker = _marker(part_dir, shard, ref, verify, markers) if markers else None
    except FileNotFoundError:
        raise CorpusError(f"{where}: shard file {shard.name} is missing") from None
    if marker is not None and marker.exists():
        return
    if verify == "sha256":
        digest = hashlib.sha256()
        size = _hash_file(shard, digest) + len(zarr_json)
        digest.update(zarr_json)
    else:
        size = shard.stat().st_size + len(zarr_json)
    if size != ref.images_bytes:
        raise mismatch(where, "length", ref.images_bytes, size)
    if verify == "sha256" and digest.hexdigest() != ref.images_sha256:
        raise mismatch(where, "sha256", ref.images_sha256, digest.hexdigest())
    if marker is not None:
        _touch(marker)


class PartFetcher:
    """Local files of parts, checked once per process; remote parts fetched into a cache."""

    def __init__(self, sources: list[CorpusSource], *, cache_dir: Path, verify: Verify) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.sources = sources
        self.cache_dir = cache_dir
        self.verify: Verify = verify
        self.markers = cache_dir / "verified"
        self._checked: set[tuple[int, str]] = set()

    def _cache_root(self, source: CorpusSource) -> Path:
        return self.cache_dir / hashlib.sha256(source.url.encode()).hexdigest()[:16]

    def images(self, ref: PartRef) -> Path:
        """A checked local folder holding the part's zarr.json and shard file."""
        source = self.sources[ref.corpus]
        where = source.describe(ref.images_path)
        key = (ref.corpus, ref.images_path)
        if source.local_root is not None:
            path = source.local_root / ref.images_path
            if key not in self._checked:
                check_images(path, ref, self.verify, where, self.markers)
        else:
            path = self._cache_root(source) / ref.images_path
            if key not in self._checked:
                try:
                    check_images(path, ref, self.verify, where, self.markers)
                except CorpusError:  # absent, or stale from an older corpus version: fetch it
                    remove_path(path)
                    self._fetch_images(source, ref, path, where)
        self._checked.add(key)
        return path

    def units_version(self, ref: PartRef) -> str:
        """What identifies the units file `units` would return, as checked against the manifest.

        Local corpus: the file's path, size, mtime and inode (a replaced file is checked again),
        with the manifest's length and sha256 and the verify mode; remote corpus: its URL with
        the manifest's length and sha256 (a fetched copy is checked against them).
        """
        source = self.sources[ref.corpus]
        if source.local_root is not None:
            try:
                where = _signature(source.local_root / ref.units_path)
            except FileNotFoundError:
                raise CorpusError(f"{source.describe(ref.units_path)}: missing") from None
        else:
            where = source.describe(ref.units_path)
        return f"{where}|{ref.units_bytes}|{ref.units_sha256}|{self.verify}"

    def units(self, ref: PartRef) -> bytes:
        """The part's units parquet bytes, checked."""
        source = self.sources[ref.corpus]
        where = source.describe(ref.units_path)
        if source.local_root is not None:
            try:
                data = (source.local_root / ref.units_path).read_bytes()
            except FileNotFoundError:
                raise CorpusError(f"{where}: missing") from None
        else:
            path = self._cache_root(source) / ref.units_path
            data = path.read_bytes() if path.exists() else b""
            if len(data) != ref.units_bytes or (
                self.verify == "sha256" and hashlib.sha256(data).hexdigest() != ref.units_sha256
            ):
                data = source.read_bytes(ref.units_path)
                check_bytes(data, ref.units_bytes, ref.units_sha256, self.verify, where)
                self._write_atomic(path, data)
                return data
        check_bytes(data, ref.units_bytes, ref.units_sha256, self.verify, where)
        return data

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(temp_name(path.name))
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            remove_path(tmp)
            raise

    def _fetch_images(self, source: CorpusSource, ref: PartRef, path: Path, where: str) -> None:
        zarr_json = source.read_bytes(f"{ref.images_path}/zarr.json")
        key = shard_key(zarr_json, where)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(temp_name(path.name))
        try:
            shard = tmp / key
            shard.parent.mkdir(parents=True)
            digest, size = hashlib.sha256(), len(zarr_json)
            try:
                with source.fs.open(source.path(f"{ref.images_path}/{key}"), "rb") as src, \
                        open(shard, "wb") as dst:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        dst.write(block)
                        size += len(block)
            except FileNotFoundError:
                raise CorpusError(f"{where}: shard file {key} is missing") from None
            digest.update(zarr_json)
            if size != ref.images_bytes:
                raise mismatch(where, "length", ref.images_bytes, size)
            if digest.hexdigest() != ref.images_sha256:
                raise mismatch(where, "sha256", ref.images_sha256, digest.hexdigest())
            (tmp / "zarr.json").write_bytes(zarr_json)
            try:
                os.rename(tmp, path)
            except OSError:  # another worker put the same verified part there first
                if not path.is_dir():
                    raise
                remove_path(tmp)
                return
            for mode in VERIFY_MODES:  # hashed on the way in: vouch for the cached copy
                _touch(_marker(path, path / key, ref, mode, self.markers))
        except BaseException:
            remove_path(tmp)
            raise
