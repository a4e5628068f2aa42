"""A zarr v3 array-to-bytes codec that stores each chunk as one baseline JPEG.

No zarr-v3 image codec ships for Python 3.11 (imagecodecs' zarr-3 codecs need Python >= 3.12), so
histmol registers this small one under the name ``histmol.jpeg``: explicitly on import of this
module and through the ``zarr.codecs`` entry point declared in pyproject.toml, so any process with
histmol installed can open a corpus with plain ``zarr.open_array``.

A chunk is one RGB patch of shape ``(1, H, W, 3)`` (leading axes of length 1 are allowed in any
number), dtype uint8. ``encode_patch`` and ``decode_patch`` are the same operations as plain
functions: the shard writer and the fast shard reader use them, so the bytes in a shard are exactly
the bytes this codec would produce. libjpeg-turbo encoding is deterministic for a given input,
quality and subsampling (checked in tests), which makes corpus rebuilds byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

from histmol.shards.jpeg import (
    CODEC_NAME,
    DEFAULT_QUALITY,
    DEFAULT_SUBSAMPLING,
    SUBSAMPLINGS,
    check_quality,
    check_subsampling,
    decode_patch,
    encode_patch,
)

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType

__all__ = [
    "CODEC_NAME",
    "DEFAULT_QUALITY",
    "DEFAULT_SUBSAMPLING",
    "SUBSAMPLINGS",
    "JpegCodec",
    "decode_patch",
    "encode_patch",
]


def _patch_shape(chunk_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The (H, W, 3) image shape of a chunk shape whose leading axes all have length 1."""
    if len(chunk_shape) < 3 or chunk_shape[-1] != 3 or any(s != 1 for s in chunk_shape[:-3]):
        raise ValueError(
            f"{CODEC_NAME} encodes chunks of shape (1, ..., H, W, 3); got chunk shape {chunk_shape}"
        )
    return (chunk_shape[-3], chunk_shape[-2], 3)


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Array-to-bytes codec: one uint8 RGB chunk of shape (1, H, W, 3) <-> one JPEG."""

    is_fixed_size = False

    quality: int = DEFAULT_QUALITY
    subsampling: str = DEFAULT_SUBSAMPLING

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", check_quality(self.quality))
        object.__setattr__(self, "subsampling", check_subsampling(self.subsampling))

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        """Build from ``{"name": "histmol.jpeg", "configuration": {...}}``."""
        _, configuration = parse_named_configuration(
            data, CODEC_NAME, require_configuration=False
        )
        config: dict[str, Any] = dict(configuration or {})
        unknown = set(config) - {"quality", "subsampling"}
        if unknown:
            raise ValueError(f"{CODEC_NAME}: unknown configuration keys {sorted(unknown)}")
        return cls(**config)

    def to_dict(self) -> dict[str, JSON]:
        """The codec's JSON form in zarr.json."""
        return {
            "name": CODEC_NAME,
            "configuration": {"quality": self.quality, "subsampling": self.subsampling},
        }

    def validate(
        self,
        *,
        shape: tuple[int, ...],
        dtype: ZDType[TBaseDType, TBaseScalar],
        chunk_grid: ChunkGrid,
    ) -> None:
        """Reject arrays that are not uint8 with a trailing RGB axis."""
        if dtype.to_native_dtype() != np.dtype(np.uint8):
            raise ValueError(f"{CODEC_NAME} needs a uint8 array, got {dtype}")
        if len(shape) < 3 or shape[-1] != 3:
            raise ValueError(f"{CODEC_NAME} needs an array of shape (..., H, W, 3), got {shape}")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        """JPEG output size is data dependent."""
        raise NotImplementedError(f"{CODEC_NAME} produces variable-sized output")

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        image_shape = _patch_shape(chunk_spec.shape)
        array = np.asarray(chunk_array.as_numpy_array()).reshape(image_shape)
        encoded = encode_patch(array, self.quality, self.subsampling)
        return chunk_spec.prototype.buffer.from_bytes(encoded)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        image_shape = _patch_shape(chunk_spec.shape)
        image = decode_patch(chunk_bytes.to_bytes())
        if image.shape != image_shape:
            raise ValueError(
                f"{CODEC_NAME}: stored JPEG is {image.shape}, the chunk expects {image_shape}"
            )
        return chunk_spec.prototype.nd_buffer.from_numpy_array(image.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)


register_codec(CODEC_NAME, JpegCodec)
