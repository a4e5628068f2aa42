"""Manifest inputs given as fsspec URLs (``s3://bucket/bundles/x/outs``): fetched to local disk.

Adapters and the WSI reader read local files (h5py, tifffile, OpenSlide), so a bundle folder or a
slide named by URL is copied once into ``$HISTMOL_CACHE_DIR/inputs/<key>/<name>`` (default
``~/.cache/histmol``) before any adapter runs. The key hashes the URL and every object's
relative name, size and version (ETag, else modification time, as `fs.info` reports them), so a
changed remote object gets a new folder and an unchanged one reuses the copy, keeping the local
files' stat fingerprint (and so the section's cache key) stable between runs. A copy is made in a
temporary sibling and renamed into place (histmol.shards.atomic.atomic_directory), so a killed
fetch never leaves a half-copied input. File systems come from ``fsspec.core.url_to_fs``
(https://filesystem-spec.readthedocs.io/en/latest/api.html); endpoints and credentials from
fsspec's config (``FSSPEC_S3='{"client_kwargs": {"endpoint_url": ...}}'``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import fsspec

from histmol.errors import ConfigError
from histmol.shards.atomic import atomic_directory

CACHE_ENV = "HISTMOL_CACHE_DIR"
LOCAL_PROTOCOLS = frozenset({"file", "local"})


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


def _version(info: dict[str, object]) -> str:
    for field in ("ETag", "etag", "LastModified", "mtime", "updated", "created"):
        if info.get(field) is not None:
            return str(info[field])
    return ""


def fetch_input(url: str) -> Path:
    """Return a local copy of the file or folder at `url` (cached; see the module docstring)."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        if fs.isdir(root):
            found = fs.find(root, detail=True)
            objects = {name[len(root) + 1:]: info for name, info in sorted(found.items())}
        else:
            objects = {"": fs.info(root)}
    except (OSError, ValueError) as error:
        raise ConfigError(f"{url}: cannot read ({error})") from error
    if not objects:
        raise ConfigError(f"{url}: no such file or folder")
    listing = [[url], *([k, int(i.get("size") or 0), _version(i)] for k, i in objects.items())]
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:24]
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "histmol")
    folder = base / "inputs" / key
    target = folder / (root.rsplit("/", 1)[-1] or "input")
    if folder.is_dir():
        return target
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_directory(folder) as tmp:
            for relative in objects:
                local = tmp / target.name / relative if relative else tmp / target.name
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{relative}" if relative else root, str(local))
    except OSError as error:
        if not folder.is_dir():  # else another process fetched the same version meanwhile
            raise ConfigError(f"{url}: fetch failed ({error})") from error
    return target
