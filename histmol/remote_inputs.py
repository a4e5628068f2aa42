"""Manifest inputs given as fsspec URLs (``s3://bucket/bundles/x/outs``): listed, then fetched.

Adapters and the WSI reader read local files (h5py, tifffile, OpenSlide), so a bundle folder or a
slide named by URL is copied into ``$HISTMOL_CACHE_DIR/inputs/<key>/<name>`` (default
``~/.cache/histmol``) before an adapter or the slide reader opens it. Planning an ingest only
LISTS each URL (`describe_input`: object names, sizes and versions, the ETag else the
modification time, as `fs.info` reports them; no bytes), which gives both the cache key (URL plus
that listing) and the input's fingerprint (that listing without the URL), so the skip decision
needs no download. The copy is made where the input is read, by `RemoteInput.fetch`, in whatever
process runs that stage: the ingest process in an in-process run, each Dask worker into its OWN
cache on a cluster whose machines share no disk. A fetch lists again and refuses an input that
changed since the plan; it copies into a temporary sibling and renames it into place
(histmol.shards.atomic.atomic_directory), so a killed fetch leaves no half-copied input and
concurrent fetches (threads or processes sharing one cache) cannot corrupt each other; within a
process a lock per key makes the others wait for the first. A changed remote object gets a new
key, an unchanged one reuses the copy. File systems come from ``fsspec.core.url_to_fs``
(https://filesystem-spec.readthedocs.io/en/latest/api.html); endpoints and credentials from
fsspec's config in each process (``FSSPEC_S3='{"client_kwargs": {"endpoint_url": ...}}'``,
https://filesystem-spec.readthedocs.io/en/latest/features.html#configuration).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from histmol.errors import ConfigError
from histmol.shards.atomic import atomic_directory

CACHE_ENV = "HISTMOL_CACHE_DIR"
LOCAL_PROTOCOLS = frozenset({"file", "local"})
TRANSIENT_ERRORS = (ConnectionError, TimeoutError)  # re-raised as such: stage tasks retry them

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def is_url(value: str) -> bool:
    """Tell whether `value` is a URL of a non-local fsspec file system."""
    return "://" in value and value.split("://", 1)[0] not in LOCAL_PROTOCOLS


def check_url(value: str) -> str:
    """`value` if its protocol is one fsspec knows (else ValueError naming it); no network."""
    protocol = value.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as error:
        raise ValueError(f"{value!r}: unknown or unavailable URL protocol {protocol!r} "
                         f"({error})") from None
    return value


def cache_dir() -> Path:
    """Return this process' cache: ``$HISTMOL_CACHE_DIR``, else ``~/.cache/histmol``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "histmol")


@dataclass(frozen=True)
class RemoteInput:
    """A file or folder at a URL as listed when the ingest was planned (small: pickles to workers).

    `key` names its cache folder (hash of the URL and every object's relative name, size and
    version); `fingerprint` hashes the same listing without the URL, so a bucket moved whole
    keeps it, as a moved source tree keeps `histmol.fingerprint.input_fingerprint`.
    """

    url: str
    key: str
    name: str
    fingerprint: str

    def local_path(self) -> Path:
        """Where this process' cache holds (or will hold) the copy."""
        return cache_dir() / "inputs" / self.key / self.name

    def fetch(self) -> Path:
        """Return the local copy, fetching it into this process' cache the first time."""
        target = self.local_path()
        folder = target.parent
        if folder.is_dir():
            return target
        with _lock(self.key):
            if folder.is_dir():  # another thread of this process fetched it meanwhile
                return target
            fs, root, objects = _list(self.url)
            if _key(self.url, objects) != self.key:
                raise ConfigError(f"{self.url}: changed since the ingest was planned (sizes or "
                                  "versions differ); run the ingest again")
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                with atomic_directory(folder) as tmp:
                    for relative in objects:
                        local = tmp / self.name / relative if relative else tmp / self.name
                        local.parent.mkdir(parents=True, exist_ok=True)
                        fs.get_file(f"{root}/{relative}" if relative else root, str(local))
            except TRANSIENT_ERRORS as error:
                raise _transient(error)(f"{self.url}: fetch failed ({error})") from error
            except OSError as error:
                if not folder.is_dir():  # else another process fetched the same version
                    raise ConfigError(f"{self.url}: fetch failed ({error})") from error
        return target


def describe_input(url: str) -> RemoteInput:
    """List the file or folder at `url` (names, sizes, versions; no bytes) as a `RemoteInput`."""
    _, root, objects = _list(url)
    name = root.rsplit("/", 1)[-1] or "input"
    listing = [[k, int(i.get("size") or 0), _version(i)] for k, i in objects.items()]
    fingerprint = hashlib.sha256(json.dumps([name, *listing]).encode()).hexdigest()[:32]
    return RemoteInput(url, _key(url, objects), name, fingerprint)


def _list(url: str) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """(file system, root path, relative name -> info); a single file's name is ``""``."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        if fs.isdir(root):
            found = fs.find(root, detail=True)
            objects = {name[len(root) + 1:]: info for name, info in sorted(found.items())}
        else:
            objects = {"": fs.info(root)}
    except TRANSIENT_ERRORS as error:
        raise _transient(error)(f"{url}: cannot list ({error})") from error
    except (OSError, ValueError) as error:
        raise ConfigError(f"{url}: cannot read ({error})") from error
    if not objects:
        raise ConfigError(f"{url}: no such file or folder")
    return fs, root, objects


def _key(url: str, objects: dict[str, dict[str, Any]]) -> str:
    listing = [[url], *([k, int(i.get("size") or 0), _version(i)] for k, i in objects.items())]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:24]


def _version(info: dict[str, Any]) -> str:
    for field in ("ETag", "etag", "LastModified", "mtime", "updated", "created"):
        if info.get(field) is not None:
            return str(info[field])
    return ""


def _transient(error: BaseException) -> type[OSError]:
    """Return the builtin class to re-raise a transient error as (its own may take other args)."""
    return TimeoutError if isinstance(error, TimeoutError) else ConnectionError


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())
