"""Detect truncated TIFF files before tiles are read (tifffile logs rather than raises)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tifffile

from histmol.errors import WSIError

logger = logging.getLogger(__name__)


def _check_tiff_data_complete(path: Path, pages: Iterable[Any]) -> None:
    """Raise if any page's image data runs past the end of the file (a truncated copy)."""
    size = os.path.getsize(path)
    for index, page in enumerate(pages):
        if page is None:
            continue
        offsets, counts = page.dataoffsets, page.databytecounts
        if not len(offsets):
            continue
        end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False))
        if end > size:
            raise WSIError(
                path,
                f"truncated: TIFF page {index} stores image data up to byte {end} but the file "
                f"has only {size} bytes",
            )


class _ThisThreadErrors(logging.Handler):
    """Collects ERROR records logged by this thread.

    tifffile logs, rather than raises, when an IFD or tag lies past the end of a damaged file,
    and then shows fewer pages.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    handler = _ThisThreadErrors()
    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        tifffile_logger.removeHandler(handler)


def _check_openslide_tiff_complete(path: Path) -> None:
    """For TIFF-based OpenSlide formats, refuse truncated copies before any tile is read."""
    with open(path, "rb") as handle:
        if handle.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return  # MIRAX, VMS and DICOM are not TIFF files
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
    except Exception as exc:  # OpenSlide opened it; tifffile's quarrel with it is not fatal
        logger.debug("%s: tifffile cannot list pages to check completeness: %s", path, exc)
        return
    _check_tiff_data_complete(path, pages)
