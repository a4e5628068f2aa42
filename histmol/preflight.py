"""Checks that need no heavy work, run by the CLI before any server, cluster or heavy import.

A typo in a path, a folder given where a file is expected, a bundle of another platform or an
`--out` that is a file should be answered in a second, not after Prefect and the readers have
started. Every check here only stats or lists files; the heavy libraries (prefect, dask, torch,
zarr, spatialdata) are never imported by this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from histmol.errors import BundleError, ConfigError, FileProblem, WSIError

__all__ = [
    "check_adapter_options",
    "check_build_inputs",
    "check_existing_file",
    "check_input_folder",
    "check_output_folder",
    "check_output_path",
    "resolve_platform",
]

AUTO = "auto"


def _is_url(value: str | os.PathLike[str]) -> bool:
    return "://" in str(value)


def check_existing_file(path: Path, what: str) -> None:
    """`path` is an existing, readable, non-empty file (FileProblem naming `what` otherwise)."""
    if _is_url(path):
        return
    if not path.exists():
        raise FileProblem(path, f"{what} not found")
    if path.is_dir():
        raise FileProblem(path, f"{what} must be a file, but this is a folder")
    if not os.access(path, os.R_OK):
        raise FileProblem(path, f"{what} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise FileProblem(path, f"{what} is empty (0 bytes)")


def check_input_folder(path: Path, what: str) -> None:
    """`path` exists and can be listed (a bundle may also be a single file, e.g. an h5ad)."""
    if _is_url(path):
        return
    if not path.exists():
        hint = _nearest_existing(path)
        raise BundleError(
            path, f"{what} not found" + (f" (nearest existing: {hint})" if hint else "")
        )
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise BundleError(path, f"{what} is not readable (permission denied)")


def _nearest_existing(path: Path) -> str:
    """The closest existing ancestor of a missing path, to help spot the typo."""
    for parent in path.absolute().parents:
        if parent.exists():
            return str(parent)
    return ""


def check_output_folder(path: str | os.PathLike[str], what: str = "--out") -> None:
    """`path` is a folder or can be created as one (not a file; nearest ancestor writable).

    An fsspec URL (s3://...) passes: reaching the store is the writer's business.
    """
    if _is_url(path):
        return
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileProblem(
                path, f"{what} is an existing file; give a folder (new or an existing corpus)"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise FileProblem(path, f"{what} is not writable (permission denied)")
        return
    _check_creatable(path, what)


def check_output_path(
    path: str | os.PathLike[str], what: str = "--out", *, overwrite: bool = False
) -> None:
    """An output file or store: its folder can be created and an existing one needs `overwrite`."""
    if _is_url(path):
        return
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileProblem(path, f"{what} already exists; give --force to replace it")
    _check_creatable(path, what)


def _check_creatable(path: Path, what: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileProblem(parent, f"is a file, so {what} {path} cannot be created in it")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise FileProblem(
                    parent, f"is not writable (permission denied), so {what} cannot be created"
                )
            return


def resolve_platform(platform: str, bundle: Path) -> str:
    """The platform to build with: `auto` detects it from file names; a mismatch is named."""
    from platform_adapters.detect import check_platform, detect_platform

    name = str(platform).strip().lower()
    if name == AUTO:
        if _is_url(bundle):
            raise ConfigError("--platform auto needs a local bundle; give the platform's name")
        return detect_platform(bundle)
    from platform_adapters import get_platform

    spec = get_platform(name)
    if not _is_url(bundle):
        check_platform(spec.name, bundle)
    return spec.name


def check_adapter_options(platform: str, options: Iterable[str]) -> None:
    """Refuse options the platform's reader does not take, naming the ones it does."""
    from platform_adapters import adapter_options

    accepted = adapter_options(platform)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"platform {platform!r} has no option {', '.join(unknown)}; its options are: "
            f"{', '.join(sorted(accepted)) or 'none'}"
        )


def check_build_inputs(
    platform: str,
    bundle: Path,
    wsi: Path,
    out: Path,
    *,
    files: Iterable[tuple[Path | None, str]] = (),
) -> str:
    """Every cheap check of `histmol build`; returns the platform name (resolved if `auto`)."""
    check_input_folder(bundle, "bundle")
    if not _is_url(wsi):
        try:
            check_existing_file(wsi, "WSI (--wsi)")
        except FileProblem as err:
            raise WSIError(err.path, err.problem) from None
    for path, what in files:
        if path is not None:
            check_existing_file(path, what)
    check_output_folder(out)
    return resolve_platform(platform, bundle)
