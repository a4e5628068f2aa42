"""One reader interface over OpenSlide, tifffile and Pillow for H&E whole-slide images.

Backends: OpenSlide for the formats it recognises (Aperio .svs, Hamamatsu .ndpi/.vms, MIRAX
.mrxs, Leica .scn, Ventana .bif, Philips and generic tiled TIFF; https://openslide.org/formats/),
tifffile for OME-TIFF and the TIFFs OpenSlide refuses (striped, SubIFD pyramids), Pillow for
the plain JPEG/PNG images of legacy ST. Every reader takes region coordinates in the frame of
the level it reads (OpenSlide itself wants level-0 coordinates), returns RGB uint8, fills what
lies outside the image with white, is safe to call from a thread pool, and never writes to the
file. The embedded mpp and the reason a placeholder was discarded come from `histmol.wsi.mpp`.
"""

from __future__ import annotations

import os
from pathlib import Path

import openslide
import tifffile

from histmol.errors import WSIError
from histmol.wsi.base import SlideReader
from histmol.wsi.mpp import validate_mpp
from histmol.wsi.openslide_backend import OpenSlideReader
from histmol.wsi.pillow_backend import PillowReader
from histmol.wsi.tifffile_backend import TifffileReader

__all__ = ["OpenSlideReader", "PillowReader", "SlideReader", "TifffileReader", "open_wsi"]
__all__ += ["validate_mpp"]

TIFFFILE_SUFFIXES = (".tif", ".tiff", ".qptiff")  # .ome.tif / .ome.tiff end in .tif / .tiff
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
SUPPORTED = (
    "OpenSlide formats (Aperio .svs, Hamamatsu .ndpi/.vms/.vmu, MIRAX .mrxs, Leica .scn, "
    "Ventana .bif, Philips and generic tiled .tif/.tiff), 8-bit RGB TIFF / OME-TIFF / .qptiff "
    "read with tifffile, and 8-bit RGB .jpg/.jpeg/.png"
)


def _prefer_tifffile(path: Path, vendor: str) -> bool:
    """Whether tifffile should read a slide that OpenSlide calls generic TIFF.

    OME-TIFF and SubIFD pyramids go to tifffile even when OpenSlide takes them as generic
    TIFF: OpenSlide would see only level 0 and ignore the OME pixel size.
    """
    if vendor != "generic-tiff":
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome or tif.pages.first.subifds)
    except Exception:  # let OpenSlide have it; its own open reports the problem
        return False


def open_wsi(path: str | os.PathLike[str]) -> SlideReader:
    """Open a slide with the backend that reads it best; raise WSIError naming the problem.

    OpenSlide when it recognises the file (except OME-TIFF / SubIFD pyramids), else tifffile
    for .tif/.tiff/.ome.tif/.qptiff, else Pillow for .jpg/.jpeg/.png.
    """
    slide_path = Path(path)
    if not slide_path.exists():
        raise WSIError(slide_path, "file not found")
    if slide_path.is_dir():
        raise WSIError(slide_path, f"is a folder, not a slide file; supported: {SUPPORTED}")
    if not os.access(slide_path, os.R_OK):
        raise WSIError(slide_path, "file is not readable (permission denied)")
    if os.path.getsize(slide_path) == 0:
        raise WSIError(slide_path, "file is empty (0 bytes)")
    try:
        vendor = openslide.OpenSlide.detect_format(str(slide_path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise WSIError(slide_path, f"cannot read the file: {exc}") from exc
    suffix = slide_path.suffix.lower()
    if vendor is not None and not _prefer_tifffile(slide_path, vendor):
        return OpenSlideReader(slide_path, vendor)
    if suffix in TIFFFILE_SUFFIXES:
        return TifffileReader(slide_path)
    if suffix in PILLOW_SUFFIXES:
        return PillowReader(slide_path)
    if suffix in OPENSLIDE_SUFFIXES:
        raise WSIError(
            slide_path,
            f"OpenSlide does not recognise this {suffix} file ({os.path.getsize(slide_path)} "
            "bytes): it is truncated or corrupt, or a variant OpenSlide does not support",
        )
    raise WSIError(
        slide_path, f"unsupported format {suffix or '(no extension)'!r}; supported: {SUPPORTED}"
    )
