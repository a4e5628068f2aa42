"""Write one section's pairs into parts: a sharded zarr v3 JPEG array plus a units parquet.

Per part ``NNNNN`` (pairs ``NNNNN * pairs_per_shard`` onwards, at most ``pairs_per_shard``):

- ``part-NNNNN.zarr``: zarr v3 array, uint8 ``(n_pairs, patch_px, patch_px, 3)``, chunks of one
  patch, ONE shard covering the whole array (``sharding_indexed``: inner codec ``histmol.jpeg``,
  index codecs ``bytes`` little-endian + ``crc32c``, index at the end). ``zarr.json`` is the
  document zarr-python's ``zarr.create_array`` writes (written out here and compared with
  zarr-python's in the tests, so a build need not import zarr); the shard file (``c/0/0/0/0``)
  is assembled here.
- ``part-NNNNN.parquet``: one row per unit, ``pair_index`` (int32, row in this part's image array)
  first, then the unit columns the builder passes; zstd row groups of whole pairs, a new one
  started once ``ROW_GROUP_UNITS`` units are buffered (a spot part is one row group; a dense
  platform's part, ~400 k units, is streamed out in several instead of held whole).

Why the shard file is assembled by hand: zarr-python writes a sharded array chunk by chunk with a
read-modify-write of the whole shard (quadratic I/O), or needs the whole shard's raw pixels in
memory at once: 2048 patches of 224 x 224 x 3 are ~300 MB raw (~600 MB with the copies zarr makes).
Here each patch is JPEG-encoded as it arrives and appended to the shard file, so memory stays at
the index plus one row group of unit rows. The bytes are the ones zarr-python would produce: the
same ``encode_patch`` as the codec, chunks in C order (the Morton order zarr uses is C order for
this shard shape), then the index; tests check zarr-python reads every patch back.

Digests (``ShardRecord``): ``images_sha256`` is the SHA-256 of the shard file's bytes followed by
the ``zarr.json`` bytes, and ``images_bytes`` the sum of both file sizes; ``units_sha256`` and
``units_bytes`` are those of the parquet file. Output bytes do not depend on temporary names,
time or paths, so a rebuild from the same input is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histmol.errors import ConfigError, CorpusError
from histmol.shards.atomic import (
    PARQUET_COMPRESSION,
    file_digest,
    fsync_dir,
    fsync_path,
    naming_path,
    remove_path,
    temp_name,
)
from histmol.shards.jpeg import (
    CODEC_NAME,
    DEFAULT_QUALITY,
    DEFAULT_SUBSAMPLING,
    check_quality,
    check_subsampling,
    encode_patch,
)
from histmol.shards.shard_reader import SHARD_CHUNK_COORDS, chunk_key, encode_index

PAIR_INDEX = "pair_index"
ROW_GROUP_UNITS = 1 << 16  # units buffered before a units row group is written
DIMENSION_NAMES = ("pair", "y", "x", "channel")
UnitsLike = pa.Table | Mapping[str, np.ndarray | Sequence[Any] | pa.Array]


def part_stem(part: int) -> str:
    """``part-00000`` for part 0."""
    return f"part-{part:05d}"


@dataclass(frozen=True)
class ShardRecord:
    """One written part. Paths are relative to the section folder (e.g. ``part-00000.zarr``)."""

    part: int
    images_path: str
    units_path: str
    n_pairs: int
    n_units: int
    images_bytes: int
    units_bytes: int
    images_sha256: str
    units_sha256: str


def part_zarr_json(
    n_pairs: int, patch_px: int, *, quality: int, subsampling: str
) -> tuple[bytes, str]:
    """(zarr.json bytes, shard file key) for a part: the document zarr-python 3 writes for it.

    Written out here instead of calling ``zarr.create_array`` so that a build does not import
    zarr-python (about 0.5 s of CPU per process); a test compares the bytes with zarr-python's
    for several shapes and codec settings. Fixed indent 2, so zarr's ``json_indent`` setting
    cannot change a corpus' bytes.
    """
    shape = [int(n_pairs), int(patch_px), int(patch_px), 3]
    key_encoding = {"name": "default", "configuration": {"separator": "/"}}
    codec = {"name": CODEC_NAME, "configuration": {"quality": quality, "subsampling": subsampling}}
    index_codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    document = {
        "shape": shape,
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shape}},
        "chunk_key_encoding": key_encoding,
        "fill_value": 0,
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": [1, int(patch_px), int(patch_px), 3],
                "codecs": [codec],
                "index_codecs": index_codecs,
                "index_location": "end",
            },
        }],
        "attributes": {},
        "dimension_names": list(DIMENSION_NAMES),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    text = json.dumps(document, allow_nan=True, indent=2)
    return text.encode(), chunk_key(key_encoding, SHARD_CHUNK_COORDS)


def _as_table(units: UnitsLike, schema: pa.Schema | None) -> pa.Table:
    """One pair's units as a table, conformed to `schema` if given (ValueError names the column)."""
    types = dict(zip(schema.names, schema.types, strict=True)) if schema is not None else {}
    if isinstance(units, pa.Table):
        table = units
    elif isinstance(units, Mapping):
        columns: dict[str, pa.Array | pa.ChunkedArray] = {}
        for name, values in units.items():
            expected = types.get(name)
            try:
                if isinstance(values, pa.Array | pa.ChunkedArray):
                    columns[name] = values if expected is None else values.cast(expected)
                else:
                    columns[name] = pa.array(values, type=expected)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
                raise ValueError(f"units column {name!r}: cannot convert ({error})") from error
        try:
            table = pa.table(columns)
        except pa.ArrowInvalid as error:
            raise ValueError(f"units columns differ in length: {error}") from error
    else:
        raise TypeError(f"units must be a pyarrow Table or a mapping of columns, got {type(units)}")
    if schema is not None and table.schema.equals(schema):
        return table  # the common case: same columns, same order, same types
    names = table.column_names
    if PAIR_INDEX in names:
        raise ValueError(f"units column {PAIR_INDEX!r} is reserved: the writer adds it")
    if len(set(names)) != len(names):
        raise ValueError(f"units have duplicate column names {names}")
    if schema is None:
        for field in table.schema:
            if pa.types.is_null(field.type):
                raise ValueError(
                    f"units column {field.name!r} has no inferable type (all values null or empty "
                    "lists): pass typed numpy arrays or a pyarrow Table"
                )
        return table
    missing = [n for n in schema.names if n not in names]
    extra = [n for n in names if n not in types]
    if missing or extra:
        name = (missing or extra)[0]
        raise ValueError(
            f"units column {name!r} is {'missing' if missing else 'unexpected'}: every pair must "
            f"have the columns of the first pair {schema.names}"
        )
    for name, expected in types.items():
        got = table.schema.field(name).type
        if got != expected:
            raise ValueError(f"units column {name!r} has type {got}, the first pair had {expected}")
    return table.select(schema.names).cast(schema)


class _OpenPart:
    """The part being filled: temporary folder, shard file, index so far and units parquet.

    The parquet is written under a temporary name, a row group at a time.
    """

    def __init__(self, section_dir: Path, part: int, schema: pa.Schema) -> None:
        self.part = part
        self.final = section_dir / f"{part_stem(part)}.zarr"
        if self.final.exists():
            raise CorpusError(f"{self.final}: already exists")
        self.tmp_dir = section_dir / temp_name(self.final.name)
        self.tmp_dir.mkdir()
        self.data_path = self.tmp_dir / temp_name("shard")
        self.handle: BinaryIO | None = open(self.data_path, "wb")  # closed in finish or abort
        self.digest = hashlib.sha256()
        self.entries: list[tuple[int, int]] = []
        self.offset = 0
        self.schema = pa.schema([pa.field(PAIR_INDEX, pa.int32(), nullable=False), *schema])
        self.units_path = section_dir / f"{part_stem(part)}.parquet"
        self.units_tmp = section_dir / temp_name(self.units_path.name)
        self.units_writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_first = 0  # pair index of pending[0]
        self.pending_units = 0
        self.n_units = 0

    def append(self, jpeg: bytes, units: pa.Table) -> None:
        assert self.handle is not None
        self.handle.write(jpeg)
        self.digest.update(jpeg)
        self.entries.append((self.offset, len(jpeg)))
        self.offset += len(jpeg)
        self.pending.append(units)
        self.pending_units += units.num_rows
        self.n_units += units.num_rows
        if self.pending_units >= ROW_GROUP_UNITS:
            self.flush_units()

    def flush_units(self) -> None:
        """Write the buffered pairs' units as one row group."""
        if self.units_writer is None:
            self.units_writer = pq.ParquetWriter(self.units_tmp, self.schema,
                                                 compression=PARQUET_COMPRESSION)
        rows = np.fromiter((t.num_rows for t in self.pending), np.int64, len(self.pending))
        pair_index = np.repeat(np.arange(self.pending_first, self.pending_first + len(rows),
                                         dtype=np.int32), rows)
        table = (pa.concat_tables(self.pending) if self.pending
                 else self.schema.remove(0).empty_table())
        table = table.add_column(0, self.schema.field(0), pa.array(pair_index, pa.int32()))
        self.units_writer.write_table(table.combine_chunks(), row_group_size=max(1, len(table)))
        self.pending_first += len(rows)
        self.pending, self.pending_units = [], 0

    def finish_units(self) -> None:
        """Write the last row group, then fsync and rename the parquet into place."""
        if self.pending or self.units_writer is None:
            self.flush_units()
        assert self.units_writer is not None
        self.units_writer.close()
        self.units_writer = None
        fsync_path(self.units_tmp)
        os.replace(self.units_tmp, self.units_path)

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.units_writer is not None:
            self.units_writer.close()
            self.units_writer = None
        remove_path(self.tmp_dir)
        remove_path(self.units_tmp)


class SectionShardWriter:
    """Context manager writing a section's pairs into ``part-NNNNN.{zarr,parquet}`` files.

    >>> with SectionShardWriter(staging, patch_px=224) as writer:   # doctest: +SKIP
    ...     writer.add_pair(patch, {"unit_id": ids, "gene_idx": genes, "counts": counts})
    >>> records = writer.records                                     # doctest: +SKIP

    Each pair's JPEG is encoded and appended to the current part's shard file immediately (raw
    patches are never buffered). A part is finished (index written, files fsynced, renamed from a
    temporary name) when it holds `pairs_per_shard` pairs, and at `close()`. On an exception inside
    the ``with`` block every file this writer created is removed.
    """

    def __init__(
        self,
        section_dir: str | os.PathLike[str],
        *,
        patch_px: int,
        pairs_per_shard: int = 2048,
        jpeg_quality: int = DEFAULT_QUALITY,
        jpeg_subsampling: str = DEFAULT_SUBSAMPLING,
    ) -> None:
        checks = (("patch_px", patch_px, 8), ("pairs_per_shard", pairs_per_shard, 1))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        try:
            self.jpeg_quality = check_quality(jpeg_quality)
            self.jpeg_subsampling = check_subsampling(jpeg_subsampling)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self.section_dir = Path(section_dir)
        self.patch_px = int(patch_px)
        self.pairs_per_shard = int(pairs_per_shard)
        self._created_dir = not self.section_dir.exists()
        self.section_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.section_dir.glob("part-*"))
        if existing:
            raise CorpusError(f"{self.section_dir}: already holds parts {existing[:3]}")
        self._schema: pa.Schema | None = None
        self._open: _OpenPart | None = None
        self._written: list[Path] = []
        self.records: list[ShardRecord] = []
        self.n_pairs = 0
        self._closed = False

    def __enter__(self) -> SectionShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add_pair(self, patch: np.ndarray, units: UnitsLike) -> None:
        """Append one pair: a (patch_px, patch_px, 3) uint8 patch and the units it covers."""
        if self._closed:
            raise ValueError(f"{self.section_dir}: writer is closed")
        expected = (self.patch_px, self.patch_px, 3)
        if not isinstance(patch, np.ndarray) or patch.shape != expected or patch.dtype != np.uint8:
            got = (patch.shape, patch.dtype) if isinstance(patch, np.ndarray) else type(patch)
            raise ValueError(f"patch must be a {expected} uint8 array, got {got}")
        table = _as_table(units, self._schema)
        jpeg = encode_patch(patch, self.jpeg_quality, self.jpeg_subsampling)
        if self._schema is None:
            self._schema = table.schema.remove_metadata()
        with naming_path(self.section_dir / f"{part_stem(len(self.records))}.zarr"):
            if self._open is None:
                self._open = _OpenPart(self.section_dir, len(self.records), self._schema)
            self._open.append(jpeg, table)
        self.n_pairs += 1
        if len(self._open.entries) == self.pairs_per_shard:
            self._finish_part()

    def _finish_part(self) -> None:
        part, self._open = self._open, None
        assert part is not None and part.handle is not None and self._schema is not None
        try:
            with naming_path(part.final):
                record = self._write_part(part)
        except BaseException:
            part.abort()
            raise
        self.records.append(record)

    def _write_part(self, part: _OpenPart) -> ShardRecord:
        assert part.handle is not None and self._schema is not None
        n = len(part.entries)
        index = encode_index(np.asarray(part.entries, dtype=np.uint64).reshape(n, 2))
        part.handle.write(index)
        part.digest.update(index)
        part.handle.flush()
        os.fsync(part.handle.fileno())
        part.handle.close()
        part.handle = None
        shard_bytes = part.offset + len(index)

        zarr_json, key = part_zarr_json(
            n, self.patch_px, quality=self.jpeg_quality, subsampling=self.jpeg_subsampling
        )
        part.digest.update(zarr_json)
        with open(part.tmp_dir / "zarr.json", "wb") as handle:
            handle.write(zarr_json)
            handle.flush()
            os.fsync(handle.fileno())
        shard_path = part.tmp_dir / key
        shard_path.parent.mkdir(parents=True)
        os.rename(part.data_path, shard_path)
        directory = shard_path.parent
        while directory != part.tmp_dir.parent:
            fsync_dir(directory)
            directory = directory.parent
        os.rename(part.tmp_dir, part.final)
        self._written.append(part.final)
        fsync_dir(self.section_dir)

        with naming_path(part.units_path):
            part.finish_units()
        units_path = part.units_path
        self._written.append(units_path)
        fsync_dir(self.section_dir)
        units_bytes, units_sha256 = file_digest(units_path)
        return ShardRecord(
            part=part.part,
            images_path=part.final.name,
            units_path=units_path.name,
            n_pairs=n,
            n_units=part.n_units,
            images_bytes=shard_bytes + len(zarr_json),
            units_bytes=units_bytes,
            images_sha256=part.digest.hexdigest(),
            units_sha256=units_sha256,
        )

    def close(self) -> list[ShardRecord]:
        """Finish the last partial part and return the records of all parts (idempotent)."""
        if not self._closed:
            if self._open is not None:
                try:
                    self._finish_part()
                except BaseException:
                    self.abort()
                    raise
            self._closed = True
        return list(self.records)

    def abort(self) -> None:
        """Remove every file this writer created (temporary and finished parts)."""
        if self._open is not None:
            self._open.abort()
            self._open = None
        for path in self._written:
            remove_path(path)
        self._written.clear()
        self.records.clear()
        self._closed = True
        if self._created_dir:
            try:
                self.section_dir.rmdir()
            except OSError:
                pass
