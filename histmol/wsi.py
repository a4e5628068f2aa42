"""One reader interface over OpenSlide, tifffile and Pillow for H&E whole-slide images.

Backends: OpenSlide for the formats it recognises (Aperio .svs, Hamamatsu .ndpi/.vms, MIRAX
.mrxs, Leica .scn, Ventana .bif, Philips and generic tiled TIFF; https://openslide.org/formats/),
tifffile for OME-TIFF and the TIFFs OpenSlide refuses (striped, SubIFD pyramids), Pillow for
the plain JPEG/PNG images of legacy ST. Every reader takes region coordinates in the frame of
the level it reads (OpenSlide itself wants level-0 coordinates), returns RGB uint8, fills what
lies outside the image with white, is safe to call from a thread pool, and never writes to the
file. The embedded mpp and the reason a placeholder was discarded come from `histmol.wsi_mpp`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import operator
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import openslide
import tifffile
from PIL import Image

from histmol.errors import WSIError
from histmol.wsi_mpp import (
    MppResult,
    first_mpp,
    mpp_from_ome,
    mpp_from_openslide,
    mpp_from_pillow_info,
    mpp_from_tiff_tags,
    validate_mpp,
)

__all__ = ["OpenSlideReader", "PillowReader", "SlideReader", "TifffileReader", "open_wsi"]
__all__ += ["validate_mpp"]

logger = logging.getLogger(__name__)

TIFFFILE_SUFFIXES = (".tif", ".tiff", ".qptiff")  # .ome.tif / .ome.tiff end in .tif / .tiff
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
SUPPORTED = (
    "OpenSlide formats (Aperio .svs, Hamamatsu .ndpi/.vms/.vmu, MIRAX .mrxs, Leica .scn, "
    "Ventana .bif, Philips and generic tiled .tif/.tiff), 8-bit RGB TIFF / OME-TIFF / .qptiff "
    "read with tifffile, and 8-bit RGB .jpg/.jpeg/.png"
)
THUMBNAIL_BAND_PX = 8_000_000  # level pixels read per band while building a thumbnail
WHITE = 255


class SlideReader(abc.ABC):
    """A read-only view of one slide's pyramid; a context manager (close releases handles).

    `level_dimensions` are (width, height) per level, level 0 first; `level_downsamples` are
    level-0 px per level px (mean of x and y, as OpenSlide reports). `embedded_mpp` is the
    level-0 um/px the file states, None when absent or a placeholder; `mpp_discard_reason` says
    why a stated value was rejected (None when accepted or when the file states nothing).
    """

    backend: ClassVar[str]

    def __init__(
        self,
        path: Path,
        level_dimensions: Sequence[tuple[int, int]],
        level_downsamples: Sequence[float],
        mpp: MppResult,
    ) -> None:
        self.path = Path(path)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.embedded_mpp: float | None = mpp.mpp
        self.mpp_discard_reason: str | None = mpp.reason
        self.mpp_source: str | None = mpp.source
        self._closed = False

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) RGB uint8 of the box at (x, y) in `level`'s own pixel frame.

        Parts outside the image are white. Safe to call concurrently from several threads.
        """
        level, x, y = operator.index(level), operator.index(x), operator.index(y)
        width, height = operator.index(width), operator.index(height)
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} not in 0..{self.level_count - 1}")
        if width < 1 or height < 1:
            raise ValueError(f"{self.path}: region size {width} x {height} must be positive")
        if self._closed:
            raise WSIError(self.path, "the slide reader is closed")
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if x0 == x and y0 == y and x1 == x + width and y1 == y + height:
            return self._read_inside(level, x, y, width, height)
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            inside = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = inside
        return out

    @abc.abstractmethod
    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) RGB uint8 of a box lying wholly inside `level`."""

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= `downsample`; level 0 if none is."""
        limit = float(downsample) * (1 + 1e-6)
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= limit and level_downsample > self.level_downsamples[best]:
                best = level
        return best

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """RGB uint8 image with longer side <= `max_side`, and level-0 px per thumbnail px.

        The longer side is exactly `max_side` unless the slide is smaller (then it is level 0,
        scale 1.0); the returned scale is exact for the longer side, the shorter side's differs
        by its rounding (under half a thumbnail pixel). Each thumbnail pixel is the exact area
        average of its footprint on the best level, read in bands so memory stays bounded even
        for a single-level giant TIFF.
        """
        max_side = operator.index(max_side)
        if max_side < 1:
            raise ValueError(f"{self.path}: thumbnail max_side {max_side} must be positive")
        width, height = self.dimensions
        longest = max(width, height)
        scale = max(1.0, longest / max_side)
        out_w = max(1, min(max_side, round(width / scale)))
        out_h = max(1, min(max_side, round(height / scale)))
        level = self.best_level_for_downsample(scale)
        level_w, level_h = self.level_dimensions[level]
        if (level_w, level_h) == (out_w, out_h):
            image = self.read_region(level, 0, 0, level_w, level_h)
        else:
            image = self._area_average(level, out_w, out_h)
        return image, longest / max(out_w, out_h)

    def _area_average(self, level: int, out_w: int, out_h: int) -> np.ndarray:
        """The whole level resampled to (out_w, out_h) by exact area averaging, band by band."""
        level_w, level_h = self.level_dimensions[level]
        weights_x = _area_weights(level_w, out_w)
        weights_y = _area_weights(level_h, out_h)
        scale_y = level_h / out_h
        band = max(1, THUMBNAIL_BAND_PX // level_w)
        total = np.zeros((out_h, out_w * 3), dtype=np.float64)
        for y0 in range(0, level_h, band):
            y1 = min(y0 + band, level_h)
            pixels = self.read_region(level, 0, y0, level_w, y1 - y0).astype(np.float32)
            columns = weights_x @ pixels.transpose(1, 0, 2).reshape(level_w, -1)
            columns = columns.reshape(out_w, y1 - y0, 3).transpose(1, 0, 2).reshape(y1 - y0, -1)
            r0, r1 = int(y0 / scale_y), min(out_h, int(np.ceil(y1 / scale_y)) + 1)
            total[r0:r1] += weights_y[r0:r1, y0:y1] @ columns
        return np.rint(total).clip(0, 255).astype(np.uint8).reshape(out_h, out_w, 3)

    def close(self) -> None:
        """Release file handles; further reads raise WSIError. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close()

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the backend's handles."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, levels={self.level_dimensions}, "
            f"mpp={self.embedded_mpp})"
        )


def _area_weights(n_in: int, n_out: int) -> Any:
    """Sparse (n_out, n_in) weights: output pixel j averages input [j*s, (j+1)*s), s = n_in/n_out,
    counting the fraction of each input pixel that falls inside."""
    import scipy.sparse as sp  # imported here: only thumbnails need it

    scale = n_in / n_out
    edges = np.arange(n_out + 1, dtype=np.float64) * scale
    edges[-1] = n_in
    starts = np.floor(edges[:-1]).astype(np.int64)
    stops = np.minimum(np.ceil(edges[1:]).astype(np.int64), n_in)
    counts = stops - starts
    rows = np.repeat(np.arange(n_out), counts)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    cols = starts[rows] + np.arange(len(rows)) - offsets
    overlap = np.minimum(cols + 1, edges[rows + 1]) - np.maximum(cols, edges[rows])
    matrix = sp.csr_matrix((overlap / scale, (rows, cols)), shape=(n_out, n_in))
    return matrix.astype(np.float32)


def _mean_downsamples(dimensions: Sequence[tuple[int, int]]) -> tuple[float, ...]:
    """Level-0 px per level px, the mean of the x and y ratios (OpenSlide's convention)."""
    width0, height0 = dimensions[0]
    return tuple((width0 / w + height0 / h) / 2.0 for w, h in dimensions)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of non-premultiplied RGBA composited onto white (transparent means no tissue)."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * a + WHITE * (255 - a) + 127) // 255).astype(np.uint8)


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
    """Collects ERROR records logged by this thread (tifffile logs, rather than raises, when
    an IFD or tag lies past the end of a damaged file, and then shows fewer pages)."""

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


class OpenSlideReader(SlideReader):
    """OpenSlide backend; OpenSlide handles are thread-safe, so reads take no lock.

    OpenSlide places a level>0 region at level-0 coordinates; x * downsample is rounded to the
    nearest level-0 pixel. Where a level's downsample is not an integer (e.g. 2.0005 in Aperio
    files whose level sizes were rounded), OpenSlide then resamples by the remaining sub-pixel
    offset (at most 0.5 / downsample level px), so such levels are not bit-exact crops.
    """

    backend = "openslide"

    def __init__(self, path: Path, vendor: str | None = None) -> None:
        try:
            slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise WSIError(
                path, f"OpenSlide recognises it as {vendor!r} but cannot open it: {exc}"
            ) from exc
        try:
            self.properties = dict(slide.properties)
            self.vendor = vendor
            mpp = mpp_from_openslide(self.properties)
            super().__init__(path, slide.level_dimensions, slide.level_downsamples, mpp)
            self._slide = slide
            _check_openslide_tiff_complete(path)
            self._read_inside(self.level_count - 1, 0, 0, 1, 1)  # a broken tile fails at open
        except BaseException:
            slide.close()
            raise

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        location = (x, y) if level == 0 else (round(x * downsample), round(y * downsample))
        try:
            image = self._slide.read_region(location, level, (width, height))
        except openslide.OpenSlideError as exc:
            raise WSIError(
                self.path, f"OpenSlide cannot read level {level} at ({x}, {y}): {exc}"
            ) from exc
        return _composite_on_white(np.asarray(image))

    def _close(self) -> None:
        self._slide.close()


class TifffileReader(SlideReader):
    """tifffile backend for OME-TIFF, SubIFD pyramids and TIFFs OpenSlide refuses.

    Levels come from `series[0].levels`. A level of at most `in_memory_max_px` pixels is decoded
    once and then sliced without a lock; larger ones are read through `aszarr` + zarr under a
    lock, because one TiffFile's file handle is not safe for concurrent reads.
    """

    backend = "tifffile"
    in_memory_max_px: ClassVar[int] = 64_000_000

    def __init__(self, path: Path) -> None:
        with _tifffile_errors() as errors:
            try:
                tif = tifffile.TiffFile(path)
            except Exception as exc:  # tifffile raises many types for corrupt files; wrap all
                problem = f"not a readable TIFF file (corrupt or truncated?): {exc}"
                raise WSIError(path, problem) from exc
            try:
                self._open(path, tif, errors)
            except BaseException:
                tif.close()
                raise

    def _open(self, path: Path, tif: tifffile.TiffFile, errors: list[str]) -> None:
        try:
            series = tif.series[0]
            levels = list(series.levels)
            ome = tif.ome_metadata if tif.is_ome else None
            from_ome = mpp_from_ome(ome) if ome else MppResult(None)
            mpp = first_mpp(from_ome, mpp_from_tiff_tags(series.keyframe.tags))
            photometric = series.keyframe.photometric
            pages = [page for level in levels for page in level.pages]
        except Exception as exc:  # wrap parser failures of a corrupt file, as above
            raise WSIError(path, f"cannot parse the TIFF structure (corrupt?): {exc}") from exc
        self._tif = tif
        self._axes = series.axes
        self._sample_axis = _rgb_sample_axis(
            path, series.axes, series.shape, series.dtype, photometric
        )
        x_axis, y_axis = self._axes.index("X"), self._axes.index("Y")
        dims = [(level.shape[x_axis], level.shape[y_axis]) for level in levels]
        super().__init__(path, dims, _mean_downsamples(dims), mpp)
        _check_tiff_data_complete(path, pages)
        if errors:
            problem = f"the TIFF structure is damaged (truncated or corrupt?): {errors[0]}"
            raise WSIError(path, problem)
        self._levels = levels
        self._lock = threading.Lock()
        self._in_memory: dict[int, np.ndarray] = {}
        self._zarr: dict[int, Any] = {}

    def _index(self, x: int, y: int, width: int, height: int) -> tuple[Any, ...]:
        """Index into the series' axes: the box in Y/X, the first 3 samples, 0 on other axes."""
        wanted = {"Y": slice(y, y + height), "X": slice(x, x + width), self._sample_axis: slice(3)}
        return tuple(wanted.get(axis, 0) for axis in self._axes)

    def _to_yxs(self, block: np.ndarray) -> np.ndarray:
        kept = [a for a in self._axes if a in ("Y", "X", self._sample_axis)]
        order = [kept.index("Y"), kept.index("X"), kept.index(self._sample_axis)]
        return np.ascontiguousarray(block.transpose(order), dtype=np.uint8)

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        index = self._index(x, y, width, height)
        level_w, level_h = self.level_dimensions[level]
        try:
            if level_w * level_h <= self.in_memory_max_px:
                return self._to_yxs(self._level_array(level)[index])
            with self._lock:
                return self._to_yxs(np.asarray(self._level_zarr(level)[index]))
        except WSIError:
            raise
        except Exception as exc:  # decoder errors on a damaged tile: name the file
            raise WSIError(self.path, f"cannot decode level {level} at ({x}, {y}): {exc}") from exc

    def _level_array(self, level: int) -> np.ndarray:
        """The whole level, decoded once (double-checked under the lock)."""
        array = self._in_memory.get(level)
        if array is None:
            with self._lock:
                array = self._in_memory.get(level)
                if array is None:
                    array = self._levels[level].asarray()
                    array.setflags(write=False)
                    self._in_memory[level] = array
        return array

    def _level_zarr(self, level: int) -> Any:
        """The level as a read-only zarr array (call with the lock held)."""
        array = self._zarr.get(level)
        if array is None:
            import zarr  # imported here: zarr is slow to import and only big levels need it

            store = self._tif.series[0].aszarr(level=level)
            array = zarr.open_array(store=store, mode="r")
            self._zarr[level] = array
        return array

    def _close(self) -> None:
        with self._lock:
            self._in_memory.clear()
            self._zarr.clear()
            self._tif.close()


def _rgb_sample_axis(
    path: Path, axes: str, shape: Sequence[int], dtype: np.dtype[Any], photometric: int
) -> str:
    """The axis holding R, G, B; raise WSIError (saying what was found) unless 8-bit RGB."""
    try:
        photometric_name = tifffile.PHOTOMETRIC(photometric).name
    except ValueError:
        photometric_name = str(photometric)
    found = f"{np.dtype(dtype)} pixels, shape {tuple(shape)}, axes {axes}, {photometric_name}"
    if np.dtype(dtype) != np.uint8:
        raise WSIError(path, f"not an 8-bit image ({found}); only 8-bit RGB H&E is supported")
    extra = [a for a, n in zip(axes, shape, strict=True) if n > 1 and a not in "YXSC"]
    samples = [a for a, n in zip(axes, shape, strict=True) if a in "SC" and n > 1]
    if "Y" not in axes or "X" not in axes or extra or len(samples) != 1:
        raise WSIError(path, f"not a single RGB plane ({found}); only 8-bit RGB H&E is supported")
    axis = samples[0]
    count = shape[axes.index(axis)]
    rgb = int(photometric) in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
    if count not in (3, 4) or not rgb:
        raise WSIError(
            path,
            f"not an RGB image ({found}): separate grey channels (fluorescence or multiplex) "
            "or other colour spaces are not supported; only 8-bit RGB H&E is",
        )
    return axis


class PillowReader(SlideReader):
    """Pillow backend for plain JPEG/PNG (legacy ST images, a few thousand px): one level,
    decoded once at open and then sliced without a lock. PIL's global image-size limit and
    truncated-image setting are left untouched; images past its limit are refused."""

    backend = "pillow"

    def __init__(self, path: Path) -> None:
        try:
            with Image.open(path, formats=["JPEG", "PNG"]) as image:
                image.load()  # decodes now, so a truncated file fails here
                mpp = mpp_from_pillow_info(image.info, image.format)
                orientation = image.getexif().get(0x0112)
                array = _pillow_rgb(path, image)
        except WSIError:
            raise
        except Image.DecompressionBombError as exc:
            raise WSIError(
                path, f"too large for the plain-image backend ({exc}); convert it to a tiled TIFF"
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise WSIError(path, f"cannot decode the image (truncated or corrupt?): {exc}") from exc
        if orientation not in (None, 1):
            logger.warning(
                "%s: EXIF Orientation %s is ignored; pixels are read as stored", path, orientation
            )
        array.setflags(write=False)
        self._array: np.ndarray | None = array
        height, width = array.shape[:2]
        super().__init__(path, [(width, height)], [1.0], mpp)

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        array = self._array
        if array is None:
            raise WSIError(self.path, "the slide reader is closed")
        return array[y : y + height, x : x + width].copy()

    def _close(self) -> None:
        self._array = None


def _pillow_rgb(path: Path, image: Image.Image) -> np.ndarray:
    """RGB uint8 of a decoded image; alpha composited onto white; grey and 16-bit refused."""
    mode = image.mode
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode in ("RGBA", "RGBa", "RGBX"):
        return _composite_on_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    found = f"Pillow mode {mode}, {image.width} x {image.height}"
    if mode in ("1", "L", "LA", "La"):
        problem = f"single-channel (greyscale) image ({found})"
    elif mode.startswith("I") or mode == "F":
        problem = f"not an 8-bit image ({found})"
    else:
        problem = f"not an RGB image ({found})"
    raise WSIError(path, f"{problem}; only 8-bit RGB H&E is supported")


def _prefer_tifffile(path: Path, vendor: str) -> bool:
    """OME-TIFF and SubIFD pyramids go to tifffile even when OpenSlide takes them as generic
    TIFF: OpenSlide would see only level 0 and ignore the OME pixel size."""
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
