"""Tests for histmol.wsi: one contract every backend satisfies, then mpp rules and errors.

Generated slides have known pixels (level i is level 0 decimated by 2**i) and are written
losslessly where pixels are compared exactly; real public fixtures come from ../shared/fixtures.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from conftest import fixture_path
from PIL import Image, ImageFile

from histmol.errors import WSIError
from histmol.wsi import SlideReader, TifffileReader, open_wsi, validate_mpp
from histmol.wsi.mpp import mpp_from_ome, mpp_from_openslide, mpp_from_tiff_resolution

CMU_SVS = "wsi_histolab/svs-images/cmu-1-small-region.svs"
TCGA_SVS = "wsi_histolab/svs-images/tcga-cr-7395-01a-01-ts1.svs"
KIDNEY_TIF = "wsi_histolab/tiff-images/kidney-48-5.tif"
RED_PEN_PNG = "wsi_histolab/pil-images-rgb/tcga-red-pen.png"
SMALL_16BIT_TIF = "wsi_pathml/smalltif.tif"
VECTRA_QPTIFF = "wsi_pathml/small_vectra.qptiff"
DICOM = "wsi_pathml/small_dicom.dcm"

WIDTH, HEIGHT = 1000, 700  # not tile multiples, so edge tiles are partial


def synthetic_rgb(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: any shift, flip or channel swap changes the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 200 // width, yy * 200 // height, (xx + 2 * yy) % 200], axis=-1)
    return (base + rng.integers(0, 56, base.shape)).astype(np.uint8)


def pyramid(base: np.ndarray, n_levels: int = 3) -> list[np.ndarray]:
    return [np.ascontiguousarray(base[:: 2**i, :: 2**i]) for i in range(n_levels)]


def write_toplevel_pyramid(path: Path, levels: list[np.ndarray], compression: str | None) -> None:
    """Each level a top-level tiled page (reduced ones subfiletype=1): OpenSlide's generic TIFF."""
    with tifffile.TiffWriter(path) as writer:
        for i, level in enumerate(levels):
            pixels_per_cm = 1e4 / (0.5 * 2**i)
            writer.write(
                level,
                photometric="rgb",
                tile=(256, 256),
                compression=compression,
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )


def write_ome_subifd_pyramid(path: Path, levels: list[np.ndarray], physical_size: float) -> None:
    """Pyramidal OME-TIFF: reduced levels in SubIFDs (OpenSlide sees 1 level), PhysicalSizeX."""
    with tifffile.TiffWriter(path) as writer:
        options = {"photometric": "rgb", "tile": (128, 128), "compression": "zlib"}
        metadata = {"axes": "YXS", "PhysicalSizeX": physical_size, "PhysicalSizeXUnit": "nm"}
        metadata |= {"PhysicalSizeY": physical_size, "PhysicalSizeYUnit": "nm"}
        writer.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **options)
        for level in levels[1:]:
            writer.write(level, subfiletype=1, **options)


@functools.cache
def tifffile_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def area_average(image: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Exact area average by bilinear interpolation of the integral image (exact for pixels
    that are constant over unit squares); written independently of histmol's sparse weights."""
    height, width = image.shape[:2]
    integral = np.zeros((height + 1, width + 1, 3))
    integral[1:, 1:] = image.astype(np.float64).cumsum(0).cumsum(1)

    def at(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        y0 = np.minimum(np.floor(ys).astype(int), height - 1)
        x0 = np.minimum(np.floor(xs).astype(int), width - 1)
        fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        top = integral[y0][:, x0] * (1 - fx) + integral[y0][:, x0 + 1] * fx
        bottom = integral[y0 + 1][:, x0] * (1 - fx) + integral[y0 + 1][:, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    ys = np.arange(out_h + 1) * height / out_h
    xs = np.arange(out_w + 1) * width / out_w
    table = at(ys, xs)
    sums = table[1:, 1:] - table[:-1, 1:] - table[1:, :-1] + table[:-1, :-1]
    return np.rint(sums / ((height / out_h) * (width / out_w))).astype(int)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class SlideCase:
    """A slide and what is known of it; `references[level]` is the exact expected level."""

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float | None
    references: dict[int, np.ndarray] = field(default_factory=dict)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Slides written once per module into a temporary folder."""
    root = tmp_path_factory.mktemp("wsi")
    levels = pyramid(synthetic_rgb())
    paths = {
        "pyramid_zlib": root / "pyramid_zlib.tif",
        "pyramid_jpeg": root / "pyramid_jpeg.tif",
        "ome_subifd": root / "pyramid.ome.tif",
        "planar_rgba": root / "planar_rgba.tif",
        "png": root / "plain.png",
    }
    write_toplevel_pyramid(paths["pyramid_zlib"], levels, "zlib")
    write_toplevel_pyramid(paths["pyramid_jpeg"], levels, "jpeg")
    write_ome_subifd_pyramid(paths["ome_subifd"], levels, physical_size=250.0)
    rgba = np.concatenate([levels[0], np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=-1)
    tifffile.imwrite(
        paths["planar_rgba"],
        np.moveaxis(rgba, -1, 0),
        photometric="rgb",
        planarconfig="separate",
        extrasamples=["unassalpha"],
        compression="zlib",
        rowsperstrip=64,
        resolution=(50800.0, 50800.0),
        resolutionunit="INCH",
    )
    Image.fromarray(levels[0]).save(paths["png"], dpi=(50800, 50800))
    return paths


LEVEL_DIMS = ((1000, 700), (500, 350), (250, 175))


class SlideReaderContract:
    """Invariants every backend must satisfy; subclasses override the `case` fixture."""

    @pytest.fixture
    def case(self) -> SlideCase:
        raise NotImplementedError

    @pytest.fixture
    def slide(self, case: SlideCase) -> Iterator[SlideReader]:
        with open_wsi(case.path) as reader:
            yield reader

    def test_backend_levels_and_mpp(self, slide: SlideReader, case: SlideCase) -> None:
        assert slide.backend == case.backend
        assert slide.path == case.path
        assert slide.level_dimensions == case.level_dimensions
        assert slide.level_count == len(case.level_dimensions) == len(slide.level_downsamples)
        assert slide.dimensions == case.level_dimensions[0]
        assert slide.level_downsamples[0] == 1.0
        width0, height0 = slide.dimensions
        levels = zip(slide.level_dimensions, slide.level_downsamples, strict=True)
        for (width, height), downsample in levels:
            assert downsample == pytest.approx((width0 / width + height0 / height) / 2, rel=1e-9)
        if case.mpp is None:
            assert slide.embedded_mpp is None
        else:
            assert slide.embedded_mpp == pytest.approx(case.mpp, rel=1e-9)
            assert slide.mpp_discard_reason is None

    def test_read_region_matches_reference_in_level_frame(
        self, slide: SlideReader, case: SlideCase
    ) -> None:
        for level, (width, height) in enumerate(slide.level_dimensions):
            x, y, w, h = width // 3, height // 4, min(97, width // 2), min(61, height // 2)
            region = slide.read_region(level, x, y, w, h)
            assert region.shape == (h, w, 3) and region.dtype == np.uint8
            reference = case.references.get(level)
            if reference is not None:
                np.testing.assert_array_equal(region, reference[y : y + h, x : x + w])
            whole = slide.read_region(level, 0, 0, width, height)
            assert whole.shape == (height, width, 3)
            if reference is not None:
                np.testing.assert_array_equal(whole, reference)

    def test_outside_the_image_is_white(self, slide: SlideReader, case: SlideCase) -> None:
        for level, (width, height) in enumerate(slide.level_dimensions):
            corner = slide.read_region(level, width - 10, height - 7, 30, 20)
            np.testing.assert_array_equal(
                corner[:7, :10], slide.read_region(level, width - 10, height - 7, 10, 7)
            )
            assert (corner[7:] == 255).all() and (corner[:, 10:] == 255).all()
            origin = slide.read_region(level, -5, -3, 20, 10)
            np.testing.assert_array_equal(origin[3:, 5:], slide.read_region(level, 0, 0, 15, 7))
            assert (origin[:3] == 255).all() and (origin[:, :5] == 255).all()
            assert (slide.read_region(level, -50, -50, 40, 40) == 255).all()
            assert (slide.read_region(level, width, 0, 8, 8) == 255).all()
            reference = case.references.get(level)
            if reference is not None:
                np.testing.assert_array_equal(corner[:7, :10], reference[-7:, -10:])

    def test_concurrent_reads_equal_sequential_reads(self, slide: SlideReader) -> None:
        rng = np.random.default_rng(1)
        boxes = []
        for _ in range(48):
            level = int(rng.integers(slide.level_count))
            width, height = slide.level_dimensions[level]
            x, y = int(rng.integers(-20, width)), int(rng.integers(-20, height))
            boxes.append((level, x, y, int(rng.integers(1, 80)), int(rng.integers(1, 80))))
        sequential = [slide.read_region(*box) for box in boxes]
        with ThreadPoolExecutor(max_workers=8) as pool:
            concurrent = list(pool.map(lambda box: slide.read_region(*box), boxes))
        for expected, got in zip(sequential, concurrent, strict=True):
            np.testing.assert_array_equal(got, expected)

    def test_best_level_for_downsample(self, slide: SlideReader) -> None:
        downsamples = slide.level_downsamples
        assert slide.best_level_for_downsample(0.25) == 0
        assert slide.best_level_for_downsample(1.0) == 0
        for level, downsample in enumerate(downsamples):
            assert slide.best_level_for_downsample(downsample) == level
            assert slide.best_level_for_downsample(downsample * (1 - 1e-9)) == level
            assert slide.best_level_for_downsample(downsample * 1.01) == level
        assert slide.best_level_for_downsample(1e6) == slide.level_count - 1

    def test_thumbnail_size_scale_and_content(self, slide: SlideReader, case: SlideCase) -> None:
        width, height = slide.dimensions
        image, scale = slide.thumbnail(128)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert max(image.shape[:2]) == 128
        assert scale == pytest.approx(max(width, height) / 128)
        assert image.shape[:2] == (round(height / scale), round(width / scale))
        reference = case.references.get(slide.best_level_for_downsample(scale))
        if reference is not None:  # the exact area average of the level it is built from
            expected = area_average(reference, *image.shape[1::-1])
            assert np.abs(image.astype(int) - expected).max() <= 1

    def test_thumbnail_at_full_size_is_level_0(self, slide: SlideReader) -> None:
        width, height = slide.dimensions
        image, scale = slide.thumbnail(max(width, height) + 5)
        assert scale == 1.0
        np.testing.assert_array_equal(image, slide.read_region(0, 0, 0, width, height))

    def test_bad_arguments_and_closed_reader(self, case: SlideCase) -> None:
        slide = open_wsi(case.path)
        with pytest.raises(ValueError, match="level"):
            slide.read_region(slide.level_count, 0, 0, 4, 4)
        with pytest.raises(ValueError, match="positive"):
            slide.read_region(0, 0, 0, 0, 4)
        slide.close()
        slide.close()
        with pytest.raises(WSIError, match="closed"):
            slide.read_region(0, 0, 0, 4, 4)


class TestOpenSlideGeneratedLossless(SlideReaderContract):
    """tifffile-written top-level-page pyramid, deflate: OpenSlide must give exact pixels."""

    @pytest.fixture
    def case(self, generated: dict[str, Path]) -> SlideCase:
        levels = pyramid(synthetic_rgb())
        refs = dict(enumerate(levels))
        return SlideCase(generated["pyramid_zlib"], "openslide", LEVEL_DIMS, 0.5, refs)


class TestOpenSlideGeneratedJpeg(SlideReaderContract):
    """Same pyramid, JPEG (YCbCr 4:2:0): OpenSlide's decode equals tifffile's exactly."""

    @pytest.fixture
    def case(self, generated: dict[str, Path]) -> SlideCase:
        path = generated["pyramid_jpeg"]
        refs = dict(enumerate(tifffile_levels(path)))
        return SlideCase(path, "openslide", LEVEL_DIMS, 0.5, refs)

    def test_jpeg_is_close_to_the_source_pixels(self, slide: SlideReader) -> None:
        for level, source in enumerate(pyramid(synthetic_rgb())):
            region = slide.read_region(level, 0, 0, *slide.level_dimensions[level])
            assert np.abs(region.astype(int) - source).mean() < 12


class TestOpenSlideCmuSvs(SlideReaderContract):
    @pytest.fixture
    def case(self) -> SlideCase:
        path = fixture_path(CMU_SVS)
        return SlideCase(path, "openslide", ((2220, 2967),), 0.499, {0: tifffile_levels(path)[0]})

    def test_mpp_comes_from_openslide_properties(self, slide: SlideReader) -> None:
        assert slide.mpp_source == "openslide.mpp-x/y"


class TestOpenSlideTcgaSvs(SlideReaderContract):
    """Two levels with a non-integer downsample (2.0005) and no mpp at all."""

    @pytest.fixture
    def case(self) -> SlideCase:
        path = fixture_path(TCGA_SVS)
        dims = ((4443, 3567), (2221, 1783))
        return SlideCase(path, "openslide", dims, None, {0: tifffile_levels(path)[0]})

    def test_no_mpp_is_absent_not_discarded(self, slide: SlideReader) -> None:
        assert slide.embedded_mpp is None and slide.mpp_discard_reason is None

    def test_level_1_is_resampled_by_a_sub_pixel_offset(self, slide: SlideReader) -> None:
        # OpenSlide positions level-1 reads at x * 2.0005 level-0 px, so away from the origin it
        # interpolates; the crop stays within a few grey levels of the stored level.
        stored = tifffile_levels(slide.path)[1]
        np.testing.assert_array_equal(slide.read_region(1, 0, 0, 64, 64), stored[:64, :64])
        region = slide.read_region(1, 1000, 800, 64, 64).astype(int)
        assert np.abs(region - stored[800:864, 1000:1064]).mean() < 8


class TestTifffileKidney(SlideReaderContract):
    """Plain striped RGB TIFF OpenSlide refuses; it carries no resolution tags at all."""

    @pytest.fixture
    def case(self) -> SlideCase:
        path = fixture_path(KIDNEY_TIF)
        with Image.open(path) as image:  # an independent decoder as the reference
            reference = np.asarray(image.convert("RGB"))
        return SlideCase(path, "tifffile", ((1493, 901),), None, {0: reference})

    def test_openslide_refuses_it(self, case: SlideCase) -> None:
        assert openslide.OpenSlide.detect_format(str(case.path)) is None

    def test_no_resolution_tags_mean_no_mpp_and_no_reason(self, slide: SlideReader) -> None:
        assert slide.embedded_mpp is None and slide.mpp_discard_reason is None


class TestTifffileOmeSubifd(SlideReaderContract):
    """OME-TIFF, SubIFD pyramid, PhysicalSizeX 250 nm: tifffile although OpenSlide detects it."""

    @pytest.fixture
    def case(self, generated: dict[str, Path]) -> SlideCase:
        refs = dict(enumerate(pyramid(synthetic_rgb())))
        return SlideCase(generated["ome_subifd"], "tifffile", LEVEL_DIMS, 0.25, refs)

    def test_openslide_would_see_only_level_0(self, case: SlideCase) -> None:
        assert openslide.OpenSlide.detect_format(str(case.path)) == "generic-tiff"
        with openslide.OpenSlide(str(case.path)) as raw:
            assert raw.level_count == 1

    def test_mpp_comes_from_ome(self, slide: SlideReader) -> None:
        assert slide.mpp_source == "OME PhysicalSizeX"


class TestTifffileOmeSubifdThroughZarr(TestTifffileOmeSubifd):
    """Same file with every level read through aszarr + zarr instead of decoded in memory."""

    @pytest.fixture(autouse=True)
    def no_in_memory_levels(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(TifffileReader, "in_memory_max_px", 0)

    def test_levels_are_not_held_in_memory(self, slide: SlideReader) -> None:
        slide.read_region(1, 3, 3, 5, 5)
        assert isinstance(slide, TifffileReader) and not slide._in_memory


class TestTifffilePlanarRgba(SlideReaderContract):
    """Planar (separate) RGBA strips: alpha is dropped; resolution 50800 dpi = 0.5 um/px."""

    @pytest.fixture
    def case(self, generated: dict[str, Path]) -> SlideCase:
        refs = {0: synthetic_rgb()}
        return SlideCase(generated["planar_rgba"], "tifffile", (LEVEL_DIMS[0],), 0.5, refs)


class TestPillowGeneratedPng(SlideReaderContract):
    """PNG with pHYs in pixels per metre (50800 dpi = 0.5 um/px)."""

    @pytest.fixture
    def case(self, generated: dict[str, Path]) -> SlideCase:
        refs = {0: synthetic_rgb()}
        return SlideCase(generated["png"], "pillow", (LEVEL_DIMS[0],), 0.5, refs)


class TestPillowRealPng(SlideReaderContract):
    """Real RGBA PNG thumbnail (alpha all opaque), no pHYs."""

    @pytest.fixture
    def case(self) -> SlideCase:
        path = fixture_path(RED_PEN_PNG)
        with Image.open(path) as image:
            reference = np.asarray(image.convert("RGB"))
        return SlideCase(path, "pillow", ((471, 448),), None, {0: reference})


# --- mpp rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (0.5, 0.5),
        (0.05, 0.05),
        (20.0, 20.0),
        (0.049, None),
        (20.5, None),
        (352.77, None),
        (0.0, None),
        (-0.5, None),
        (float("nan"), None),
        (float("inf"), None),
    ],
)
def test_validate_mpp(value: float | None, expected: float | None) -> None:
    assert validate_mpp(value) == expected


def test_discarded_mpp_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="histmol.wsi.mpp"):
        assert validate_mpp(100.0) is None
    assert "outside the plausible" in caplog.text


def test_openslide_properties_average_x_and_y_or_keep_x() -> None:
    both = mpp_from_openslide({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.2502"})
    assert both.mpp == pytest.approx(0.2501)
    differ = mpp_from_openslide({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.30"})
    assert differ.mpp == 0.25
    inch = {"tiff.XResolution": "50800", "tiff.YResolution": "50800", "tiff.ResolutionUnit": "inch"}
    assert mpp_from_openslide(inch).mpp == pytest.approx(0.5)
    none = mpp_from_openslide({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"})
    assert none.mpp is None and "no unit" in str(none.reason)
    assert mpp_from_openslide({"tiff.ResolutionUnit": "inch"}).mpp is None


@pytest.mark.parametrize(
    ("x_res", "unit", "mpp", "reason"),
    [
        ((20000, 1), 3, 0.5, None),
        ((50800, 1), 2, 0.5, None),
        ((50800, 1), None, 0.5, None),  # no ResolutionUnit tag: TIFF's default is INCH
        ((72, 1), 2, None, "placeholder"),
        ((96, 1), 2, None, "placeholder"),
        ((1, 1), 3, None, "placeholder"),
        ((2, 1), 1, None, "no unit"),
        ((100, 1), 3, None, "outside the plausible"),
        ((1, 0), 3, None, None),
    ],
)
def test_tiff_resolution_rules(
    x_res: tuple[int, int], unit: int | None, mpp: float | None, reason: str | None
) -> None:
    result = mpp_from_tiff_resolution(x_res, x_res, unit)
    assert result.mpp == (None if mpp is None else pytest.approx(mpp))
    if reason is None:
        assert result.reason is None
    else:
        assert reason in str(result.reason)


@pytest.mark.parametrize(
    ("size", "unit", "mpp"),
    [("0.5", None, 0.5), ("500", "nm", 0.5), ("0.0005", "mm", 0.5), ("0.5", "µm", 0.5)],
)
def test_ome_physical_size_units(size: str, unit: str | None, mpp: float) -> None:
    unit_attr = "" if unit is None else f' PhysicalSizeXUnit="{unit}"'
    xml = f'<OME xmlns="x"><Image><Pixels PhysicalSizeX="{size}"{unit_attr}/></Image></OME>'
    assert mpp_from_ome(xml).mpp == pytest.approx(mpp)


def test_ome_unknown_unit_is_discarded_with_reason() -> None:
    xml = '<OME><Image><Pixels PhysicalSizeX="0.5" PhysicalSizeXUnit="parsec"/></Image></OME>'
    result = mpp_from_ome(xml)
    assert result.mpp is None and "parsec" in str(result.reason)


def save_jpeg(path: Path, **options: object) -> Path:
    Image.fromarray(synthetic_rgb(64, 48)).save(path, quality=90, **options)
    return path


@pytest.mark.parametrize(
    ("options", "mpp", "reason"),
    [
        ({"dpi": (72, 72)}, None, "72 dpi is a software default placeholder"),
        ({"dpi": (96, 96)}, None, "96 dpi"),
        ({}, None, "no unit"),  # Pillow writes JFIF density 1:1 without a unit
        ({"dpi": (50800, 50800)}, 0.5, None),
        ({"dpi": (300, 300)}, None, "outside the plausible"),
    ],
)
def test_jpeg_dpi_rules(
    tmp_path: Path, options: dict[str, object], mpp: float | None, reason: str | None
) -> None:
    with open_wsi(save_jpeg(tmp_path / "image.jpg", **options)) as slide:
        assert slide.backend == "pillow"
        assert slide.embedded_mpp == (None if mpp is None else pytest.approx(mpp))
        if reason is None:
            assert slide.mpp_discard_reason is None
        else:
            assert reason in str(slide.mpp_discard_reason)


@pytest.mark.parametrize(
    ("resolution", "unit", "mpp", "reason"),
    [
        ((2.0, 2.0), "NONE", None, "no unit"),
        ((20000.0, 20000.0), "CENTIMETER", 0.5, None),
        ((50800.0, 50800.0), "INCH", 0.5, None),
        ((72.0, 72.0), "INCH", None, "placeholder"),
    ],
)
def test_tiff_resolution_through_the_tifffile_backend(
    tmp_path: Path,
    resolution: tuple[float, float],
    unit: str,
    mpp: float | None,
    reason: str | None,
) -> None:
    path = tmp_path / "striped.tif"
    tifffile.imwrite(
        path, synthetic_rgb(64, 48), photometric="rgb", resolution=resolution, resolutionunit=unit
    )
    with open_wsi(path) as slide:
        assert slide.backend == "tifffile"
        assert slide.embedded_mpp == (None if mpp is None else pytest.approx(mpp))
        assert (slide.mpp_discard_reason is None) == (reason is None)
        if reason is not None:
            assert reason in str(slide.mpp_discard_reason)


# --- routing, errors and side effects --------------------------------------------------------


def test_routing_of_real_fixtures() -> None:
    expected = {CMU_SVS: "openslide", TCGA_SVS: "openslide", KIDNEY_TIF: "tifffile"}
    expected[RED_PEN_PNG] = "pillow"
    for relative, backend in expected.items():
        with open_wsi(fixture_path(relative)) as slide:
            assert slide.backend == backend


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.svs"
    with pytest.raises(WSIError, match="file not found") as info:
        open_wsi(path)
    assert info.value.path == str(path)


def test_folder_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(WSIError, match="folder"):
        open_wsi(tmp_path)
    empty = tmp_path / "empty.tif"
    empty.touch()
    with pytest.raises(WSIError, match="empty") as info:
        open_wsi(empty)
    assert str(empty) in str(info.value)


def test_unsupported_extension_names_the_supported_formats(tmp_path: Path) -> None:
    path = tmp_path / "slide.xyz"
    path.write_bytes(b"not an image at all")
    with pytest.raises(WSIError, match="unsupported format '.xyz'") as info:
        open_wsi(path)
    for name in (".svs", ".ndpi", ".mrxs", ".tif", "OME-TIFF", ".jpg", ".png"):
        assert name in info.value.problem


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_plain_image(tmp_path: Path, suffix: str) -> None:
    source = tmp_path / f"whole{suffix}"
    Image.fromarray(synthetic_rgb(300, 200)).save(source)
    path = truncated_copy(source, tmp_path / f"cut{suffix}", 0.6)
    with pytest.raises(WSIError, match="truncated") as info:
        open_wsi(path)
    assert info.value.path == str(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.95, 0.999])
@pytest.mark.parametrize("name", ["pyramid_zlib", "pyramid_jpeg", "ome_subifd", "planar_rgba"])
def test_truncated_tiff(
    tmp_path: Path, generated: dict[str, Path], name: str, fraction: float
) -> None:
    path = truncated_copy(generated[name], tmp_path / generated[name].name, fraction)
    with pytest.raises(WSIError) as info:
        with open_wsi(path) as slide:
            for level, (width, height) in enumerate(slide.level_dimensions):
                slide.read_region(level, 0, 0, width, height)
    assert info.value.path == str(path)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_svs(tmp_path: Path, fraction: float) -> None:
    path = truncated_copy(fixture_path(CMU_SVS), tmp_path / "cut.svs", fraction)
    with pytest.raises(WSIError, match="truncated or corrupt") as info:
        open_wsi(path)
    assert info.value.path == str(path)


def test_16_bit_tiff_is_refused_naming_the_dtype() -> None:
    path = fixture_path(SMALL_16BIT_TIF)
    with pytest.raises(WSIError, match="uint16") as info:
        open_wsi(path)
    assert info.value.path == str(path) and "8-bit" in info.value.problem


def test_fluorescence_qptiff_is_refused() -> None:
    with pytest.raises(WSIError, match="not an RGB image.*CYX"):
        open_wsi(fixture_path(VECTRA_QPTIFF))


def test_dicom_openslide_cannot_open_is_reported() -> None:
    with pytest.raises(WSIError, match="'dicom'"):
        open_wsi(fixture_path(DICOM))


def test_greyscale_images_are_refused(tmp_path: Path) -> None:
    grey = synthetic_rgb(64, 48)[..., 0]
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    Image.fromarray(grey).save(tmp_path / "grey.jpg")
    Image.fromarray(grey.astype(np.uint16) * 200).save(tmp_path / "deep.png")
    with pytest.raises(WSIError, match="uint8 pixels, shape \\(48, 64\\)"):
        open_wsi(tmp_path / "grey.tif")
    with pytest.raises(WSIError, match="single-channel.*mode L"):
        open_wsi(tmp_path / "grey.jpg")
    with pytest.raises(WSIError, match="not an 8-bit image"):
        open_wsi(tmp_path / "deep.png")


def test_a_jpeg_named_png_is_still_read(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_rgb(64, 48)).save(buffer, format="JPEG")
    path = tmp_path / "mislabelled.png"
    path.write_bytes(buffer.getvalue())
    with open_wsi(path) as slide:
        assert slide.dimensions == (64, 48)


def test_reading_never_writes_the_input(generated: dict[str, Path]) -> None:
    for path in generated.values():
        before = (sha256(path), path.stat().st_mtime_ns)
        with open_wsi(path) as slide:
            slide.thumbnail(64)
            slide.read_region(0, -3, -3, 50, 50)
        assert (sha256(path), path.stat().st_mtime_ns) == before


def test_pil_globals_are_untouched(generated: dict[str, Path]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    with open_wsi(generated["png"]):
        pass
    assert Image.MAX_IMAGE_PIXELS == limit
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
