"""Fast, zarr-free reads of one corpus part (a sharded zarr v3 array of JPEG patches).

zarr-python costs about 1 ms per chunk read; reading the shard index once and `os.pread`-ing each
JPEG directly is 5x faster and is what the streaming loader uses. The byte layout follows the
zarr v3 ``sharding_indexed`` codec (https://zarr-specs.readthedocs.io/en/latest/v3/codecs/
sharding-indexed/v1.0.html): a shard is the inner chunks' encoded bytes plus an index of
``(offset, nbytes)`` uint64 pairs, one per inner chunk in C order, encoded with the index codecs
(``bytes`` little-endian then ``crc32c``: a 4-byte little-endian CRC-32C of the index bytes is
appended), stored at the shard's end (``index_location: end``, the default) or start. An entry of
``(2**64-1, 2**64-1)`` marks an empty chunk. zarr-python stays the public reader of the format;
this module only accepts what histmol writes: uint8 ``(n, H, W, 3)`` arrays with one shard over
the whole array and ``histmol.jpeg`` inner chunks of shape ``(1, H, W, 3)``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c  # zarr's own crc32c dependency; importing it does not import zarr
import numpy as np

from histmol.errors import CorpusError
from histmol.shards.jpeg import CODEC_NAME, decode_patch, misaligned_empty

EMPTY = 2**64 - 1
INDEX_ENTRY_BYTES = 16
CRC_BYTES = 4
SHARD_CHUNK_COORDS = (0, 0, 0, 0)


def index_size(n_chunks: int) -> int:
    """Encoded size of a shard index for `n_chunks` inner chunks (bytes codec + crc32c)."""
    return INDEX_ENTRY_BYTES * n_chunks + CRC_BYTES


def encode_index(offsets_and_nbytes: np.ndarray) -> bytes:
    """Encode an (n, 2) array of (offset, nbytes) as the spec's index: uint64 LE + crc32c LE."""
    raw = np.ascontiguousarray(offsets_and_nbytes, dtype="<u8").tobytes()
    return raw + struct.pack("<I", google_crc32c.value(raw))


def decode_index(data: bytes, n_chunks: int, *, path: Path) -> np.ndarray:
    """Check the CRC-32C of an encoded index and return it as an (n, 2) uint64 array."""
    if len(data) != index_size(n_chunks):
        expected = index_size(n_chunks)
        raise CorpusError(f"{path}: shard index is {len(data)} bytes, expected {expected}")
    raw, (stored,) = data[:-CRC_BYTES], struct.unpack("<I", data[-CRC_BYTES:])
    computed = google_crc32c.value(raw)
    if computed != stored:
        raise CorpusError(
            f"{path}: shard index checksum mismatch (stored crc32c {stored:#010x}, "
            f"computed {computed:#010x}): the file is corrupt or truncated"
        )
    return np.frombuffer(raw, dtype="<u8").reshape(n_chunks, 2)


def chunk_key(chunk_key_encoding: dict[str, Any], coords: tuple[int, ...]) -> str:
    """The store key of a chunk under a v3 ``default`` or ``v2`` chunk key encoding."""
    name = chunk_key_encoding.get("name")
    separator = (chunk_key_encoding.get("configuration") or {}).get("separator")
    if name == "default":
        separator = separator or "/"
        return separator.join(["c", *map(str, coords)])
    if name == "v2":
        separator = separator or "."
        return separator.join(map(str, coords))
    raise ValueError(f"unsupported chunk_key_encoding {chunk_key_encoding!r}")


def _bad(path: Path, problem: str) -> CorpusError:
    return CorpusError(f"{path}: {problem}")


def parse_part_metadata(path: Path) -> dict[str, Any]:
    """Validate a part's zarr.json against what histmol writes; return the layout facts.

    Returns ``shape``, ``patch_px``, ``shard_key`` (relative path of the shard file),
    ``index_location`` and ``jpeg`` (the inner codec's configuration).
    """
    meta_path = path / "zarr.json"
    try:
        meta = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        raise _bad(meta_path, "missing: not a histmol corpus part") from None
    except (OSError, ValueError) as error:
        raise _bad(meta_path, f"unreadable ({error})") from error
    try:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise ValueError("not a zarr v3 array")
        if meta.get("data_type") != "uint8":
            raise ValueError(f"data_type is {meta.get('data_type')!r}, expected 'uint8'")
        shape = tuple(int(s) for s in meta["shape"])
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[0] < 1:
            raise ValueError(f"shape {shape} is not (n_pairs >= 1, patch_px, patch_px, 3)")
        grid = meta["chunk_grid"]
        if grid.get("name") != "regular" or tuple(grid["configuration"]["chunk_shape"]) != shape:
            raise ValueError("expected one regular chunk (shard) covering the whole array")
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            raise ValueError("expected exactly one codec, sharding_indexed")
        config = codecs[0]["configuration"]
        if tuple(config["chunk_shape"]) != (1, *shape[1:]):
            raise ValueError(f"inner chunk shape {config['chunk_shape']} is not one patch")
        inner = config["codecs"]
        if len(inner) != 1 or inner[0].get("name") != CODEC_NAME:
            raise ValueError(f"inner codecs {inner} are not [{CODEC_NAME}]")
        index_codecs = config["index_codecs"]
        names = [c.get("name") for c in index_codecs]
        endian = (index_codecs[0].get("configuration") or {}).get("endian") if names else None
        if names != ["bytes", "crc32c"] or endian != "little":
            raise ValueError(f"index codecs {index_codecs} are not [bytes little-endian, crc32c]")
        location = config.get("index_location", "end")
        if location not in ("start", "end"):
            raise ValueError(f"index_location {location!r}")
        key = chunk_key(meta["chunk_key_encoding"], SHARD_CHUNK_COORDS)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _bad(meta_path, f"unexpected part metadata: {error}") from error
    return {
        "shape": shape,
        "patch_px": shape[1],
        "shard_key": key,
        "index_location": location,
        "jpeg": dict(inner[0].get("configuration") or {}),
    }


class ShardReader:
    """Random access to the JPEG patches of one ``part-NNNNN.zarr``, without zarr-python.

    Opens the shard file once, reads and checks its index (CRC-32C, bounds, truncation), then
    serves each patch with one ``os.pread``. Thread-safe; picklable (a copy reopens the file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        facts = parse_part_metadata(self.path)
        self.shape: tuple[int, int, int, int] = facts["shape"]
        self.patch_px: int = facts["patch_px"]
        self.jpeg_config: dict[str, Any] = facts["jpeg"]
        self.shard_path = self.path / facts["shard_key"]
        n = self.shape[0]
        try:
            self._fd: int | None = os.open(self.shard_path, os.O_RDONLY)
        except FileNotFoundError:
            raise _bad(self.shard_path, "shard file is missing") from None
        try:
            self._load_index(n, facts["index_location"])
        except BaseException:
            self.close()
            raise

    def _load_index(self, n: int, location: str) -> None:
        assert self._fd is not None
        file_size = os.fstat(self._fd).st_size
        size = index_size(n)
        if file_size < size:
            raise _bad(
                self.shard_path, f"truncated: {file_size} bytes cannot hold a {size}-byte index"
            )
        start = file_size - size if location == "end" else 0
        data = os.pread(self._fd, size, start)
        index = decode_index(data, n, path=self.shard_path)
        data_start, data_end = (0, file_size - size) if location == "end" else (size, file_size)
        offsets, nbytes = index[:, 0], index[:, 1]
        empty = (offsets == EMPTY) & (nbytes == EMPTY)
        stored = ~empty
        with np.errstate(over="ignore"):
            ends = offsets + nbytes
        bad = stored & (
            (offsets < data_start) | (ends > data_end) | (ends < offsets) | (nbytes == 0)
        )
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _bad(
                self.shard_path,
                f"truncated or corrupt: chunk {i} at offset {int(offsets[i])} with "
                f"{int(nbytes[i])} bytes lies outside the data region "
                f"[{data_start}, {data_end})",
            )
        self.n_pairs = n
        self._offsets: list[int] = [int(v) for v in offsets]
        self._nbytes: list[int] = [int(v) for v in nbytes]
        self._empty: np.ndarray = empty
        self.index = np.array(index)  # a copy: (n, 2) uint64 (offset, nbytes)

    def __len__(self) -> int:
        return self.n_pairs

    def read_jpeg(self, i: int) -> bytes:
        """The stored JPEG bytes of patch `i`."""
        if not 0 <= i < self.n_pairs:
            raise IndexError(f"{self.path}: patch {i} out of range 0..{self.n_pairs - 1}")
        if self._fd is None:
            raise ValueError(f"{self.path}: reader is closed")
        n = self._nbytes[i]
        if self._empty[i]:
            raise _bad(self.shard_path, f"chunk {i} is empty (histmol parts store every patch)")
        data = os.pread(self._fd, n, self._offsets[i])
        if len(data) != n:
            raise _bad(self.shard_path, f"truncated: chunk {i} returned {len(data)} of {n} bytes")
        return data

    def read_patch(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Patch `i` decoded to a (patch_px, patch_px, 3) uint8 array, or into `out`.

        `out` (a C-contiguous (patch_px, patch_px, 3) uint8 view, e.g. a row of a batch) saves
        the per-patch array and the copy into the batch (``imagecodecs.jpeg8_decode(out=)``);
        without it the patch goes to a new array laid out for a fast decode (`misaligned_empty`).
        """
        data = self.read_jpeg(i)
        if out is None:
            out = misaligned_empty(self.shape[1:])
        try:
            patch = decode_patch(data, out=out)
        except Exception as error:  # imagecodecs raises its own JpegError types
            raise _bad(self.shard_path, f"chunk {i} is not a decodable JPEG of shape "
                                        f"{self.shape[1:]} ({error})") from error
        if patch.shape != self.shape[1:]:
            raise _bad(self.shard_path, f"chunk {i} decodes to {patch.shape}, not {self.shape[1:]}")
        return patch

    def iter_jpegs(self) -> Iterator[bytes]:
        """All JPEGs in pair order."""
        for i in range(self.n_pairs):
            yield self.read_jpeg(i)

    def close(self) -> None:
        """Close the shard file (idempotent)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]
