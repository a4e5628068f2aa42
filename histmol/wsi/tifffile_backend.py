"""tifffile backend: OME-TIFF, SubIFD pyramids and TIFFs OpenSlide refuses."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tifffile

from histmol.errors import WSIError
from histmol.wsi.base import SlideReader, _mean_downsamples
from histmol.wsi.mpp import (
    MppResult,
    first_mpp,
    mpp_from_ome,
    mpp_from_tiff_tags,
)
from histmol.wsi.tiff_checks import _check_tiff_data_complete, _tifffile_errors
from histmol.wsi.tiff_tiles import TileCache, series_tile_levels


class TifffileReader(SlideReader):
    """tifffile backend for OME-TIFF, SubIFD pyramids and TIFFs OpenSlide refuses.

    Levels come from `series[0].levels`. A level stored as one tiled 8-bit RGB page is read from
    its tiles, each decoded once (histmol.wsi.tiff_tiles). Otherwise a level of at most
    `in_memory_max_px` pixels is decoded once and then sliced without a lock; larger ones are
    read through `aszarr` + zarr under a lock, because one TiffFile's file handle is not safe
    for concurrent reads.
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
        try:
            tiled = series_tile_levels(series)
        except Exception:  # an unusual page layout: read it the general way below
            tiled = {}
        self._tiles = TileCache(path, tiled) if tiled else None
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
            if self._tiles is not None and level in self._tiles.levels:
                return self._tiles.read(level, x, y, width, height)
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
            if self._tiles is not None:
                self._tiles.close()


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
