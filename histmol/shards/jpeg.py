"""JPEG encoding of one RGB patch, shared by the zarr codec, the shard writer and the reader.

This module imports no zarr-python, so the hot read path (ShardReader, the loader's workers) stays
light. libjpeg-turbo (through imagecodecs) is deterministic: one input, quality and subsampling
always give the same bytes, which keeps corpus rebuilds byte-identical.
"""

from __future__ import annotations

import imagecodecs
import numpy as np

CODEC_NAME = "histmol.jpeg"
SUBSAMPLINGS = ("444", "422", "420")
DEFAULT_QUALITY = 90
DEFAULT_SUBSAMPLING = "420"

# libjpeg-turbo's AVX2 colour conversion stores an output row that starts on a 32-byte boundary
# with non-temporal stores (``vmovntdq``, bypassing the cache) and any other row with ordinary
# ones (simd/x86_64/jdmrgext-avx2.asm, jdcolext-avx2.asm in
# https://github.com/libjpeg-turbo/libjpeg-turbo). Decoding the benchmark corpus' 224 px patches
# into 32-byte-aligned rows ran at ~3,700/s on the development machine against ~4,450/s into rows
# 16 bytes off; glibc's malloc hands out either, about half the time each. Patches the loader
# decodes (batch rows, single patches) therefore start 16 bytes past a 32-byte boundary; every
# row of a patch does when its row stride (3 x width) is a multiple of 32 bytes.
ROW_ALIGNMENT, ROW_OFFSET = 32, 16


def misaligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array whose data starts `ROW_OFFSET` bytes past a 32-byte boundary.

    Memory for decoded patches (see `ROW_ALIGNMENT`): decoding into it avoids libjpeg-turbo's
    non-temporal stores.
    """
    n = int(np.prod(shape))
    raw = np.empty(n + ROW_ALIGNMENT, np.uint8)
    start = (ROW_OFFSET - raw.ctypes.data) % ROW_ALIGNMENT
    return raw[start:start + n].reshape(shape)


def check_quality(quality: object) -> int:
    """`quality` as an int in 1..100, else ValueError."""
    if isinstance(quality, bool) or not isinstance(quality, int | np.integer):
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    return int(quality)


def check_subsampling(subsampling: object) -> str:
    """`subsampling` if it is one of SUBSAMPLINGS, else ValueError."""
    if subsampling not in SUBSAMPLINGS:
        raise ValueError(f"JPEG subsampling must be one of {SUBSAMPLINGS}, got {subsampling!r}")
    return str(subsampling)


def encode_patch(
    patch: np.ndarray, quality: int = DEFAULT_QUALITY, subsampling: str = DEFAULT_SUBSAMPLING
) -> bytes:
    """Encode one (H, W, 3) uint8 RGB patch as baseline JPEG bytes (YCbCr, no optimisation)."""
    if patch.dtype != np.uint8 or patch.ndim != 3 or patch.shape[2] != 3:
        raise ValueError(
            f"a patch must be a (H, W, 3) uint8 array, got shape {patch.shape} dtype {patch.dtype}"
        )
    return bytes(
        imagecodecs.jpeg8_encode(
            np.ascontiguousarray(patch), level=quality, subsampling=subsampling
        )
    )


def decode_patch(data: bytes | bytearray | memoryview, out: np.ndarray | None = None) -> np.ndarray:
    """Decode JPEG bytes to an (H, W, 3) uint8 array (into `out` when given: same shape)."""
    image = imagecodecs.jpeg8_decode(data, out=out)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"JPEG decoded to shape {image.shape} {image.dtype}, not (H, W, 3) uint8")
    return image
