"""Plain JPEG/PNG slides: histmol's own size check from the header, no Pillow bomb warning."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histmol.errors import WSIError
from histmol.wsi import open_wsi
from histmol.wsi.pillow_backend import MAX_PLAIN_IMAGE_PIXELS, open_plain_image


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header states width x height (no pixel data: only the header is read)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_size_past_pillows_limit_opens_without_its_warning(tmp_path: Path) -> None:
    path = png_header(tmp_path / "big.png", 20_000, 20_000)  # 400 Mpx: Pillow's open refuses it
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_plain_image(path) as image:
            assert image.size == (20_000, 20_000)
    assert Image.MAX_IMAGE_PIXELS == limit  # no global side effect


def test_size_past_histmols_limit_is_refused_from_the_header(tmp_path: Path) -> None:
    path = png_header(tmp_path / "huge.png", 40_000, 40_000)
    assert 40_000 * 40_000 > MAX_PLAIN_IMAGE_PIXELS
    with pytest.raises(WSIError, match=r"huge.png: 40000 x 40000 px \(4.5 GiB decoded\).*tiled"):
        open_wsi(path)


def test_small_images_decode_and_the_limit_is_per_call(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "s.png")
    with open_wsi(tmp_path / "s.png") as slide:
        assert slide.dimensions == (80, 60)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 80, 60), rgb)
    with pytest.raises(WSIError, match="80 x 60 px"):
        open_plain_image(tmp_path / "s.png", max_pixels=4000)
    (tmp_path / "g.jpg").write_bytes(b"GIF89a" + bytes(20))
    with pytest.raises(WSIError, match="not a JPEG or PNG"):
        open_plain_image(tmp_path / "g.jpg")
