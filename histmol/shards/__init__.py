"""Shards and the corpus: writing pairs to sharded JPEG zarr arrays plus unit parquets.

Names are imported lazily so that ``histmol.shards.shard_reader`` (the loader's hot path) does not
pull in zarr-python; ``histmol.shards.jpeg_codec`` registers the ``histmol.jpeg`` zarr codec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histmol.shards.corpus import Corpus
    from histmol.shards.jpeg import decode_patch, encode_patch
    from histmol.shards.jpeg_codec import JpegCodec
    from histmol.shards.shard_reader import ShardReader
    from histmol.shards.shard_writer import SectionShardWriter, ShardRecord

__all__ = [
    "Corpus",
    "JpegCodec",
    "SectionShardWriter",
    "ShardReader",
    "ShardRecord",
    "decode_patch",
    "encode_patch",
]

# name -> module that defines it; the keys are exactly `__all__`
_EXPORTS = {
    "Corpus": "histmol.shards.corpus",
    "JpegCodec": "histmol.shards.jpeg_codec",
    "SectionShardWriter": "histmol.shards.shard_writer",
    "ShardReader": "histmol.shards.shard_reader",
    "ShardRecord": "histmol.shards.shard_writer",
    "decode_patch": "histmol.shards.jpeg",
    "encode_patch": "histmol.shards.jpeg",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
