"""Shard writer, fast reader and JPEG codec: byte layout, zarr-python interop, determinism."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from zarr.registry import get_codec_class

from histmol.errors import ConfigError, CorpusError
from histmol.shards.atomic import atomic_directory, atomic_write_bytes, atomic_write_json
from histmol.shards.jpeg import decode_patch, encode_patch
from histmol.shards.jpeg_codec import JpegCodec
from histmol.shards.shard_reader import ShardReader
from histmol.shards.shard_writer import SectionShardWriter, ShardRecord

PX = 64


def textured_patch(seed: int, px: int = PX) -> np.ndarray:
    """A smooth, H&E-like RGB texture (sinusoids + mild noise): JPEG-friendly like tissue."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:px, 0:px].astype(np.float64)
    base = np.zeros((px, px, 3))
    for _ in range(4):
        fx, fy, phase = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6.3)
        wave = np.sin(fx * x + fy * y + phase)
        base += wave[..., None] * rng.uniform(10, 30, size=3)
    base += np.array([200.0, 150.0, 190.0]) + rng.normal(0, 2, size=base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def units_for(i: int) -> dict[str, object]:
    n = 1 + i % 3
    return {
        "unit_id": [f"u{i}-{k}" for k in range(n)],
        "x_in_patch_px": np.arange(n, dtype=np.float32) + i,
        "gene_idx": [np.arange(k + 1, dtype=np.int32) + i for k in range(n)],
        "counts": [np.full(k + 1, i + 1, dtype=np.int32) for k in range(n)],
    }


def write_section(
    path: Path, n_pairs: int, *, pairs_per_shard: int = 4, seed: int = 0
) -> list[ShardRecord]:
    with SectionShardWriter(path, patch_px=PX, pairs_per_shard=pairs_per_shard) as writer:
        for i in range(n_pairs):
            writer.add_pair(textured_patch(seed + i), units_for(i))
    return writer.close()


def all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def parse_shard_by_hand(shard: Path, n: int) -> list[bytes]:
    """Split a shard file per the sharding spec: chunks, then n x (offset, nbytes) <u8, crc32c."""
    data = shard.read_bytes()
    index_bytes = data[-(16 * n + 4) :]
    raw, crc = index_bytes[:-4], struct.unpack("<I", index_bytes[-4:])[0]
    assert crc == google_crc32c.value(raw)
    entries = [struct.unpack_from("<QQ", raw, 16 * i) for i in range(n)]
    expected_offset = 0
    for offset, nbytes in entries:  # histmol writes chunks densely, in pair order
        assert offset == expected_offset
        expected_offset += nbytes
    assert expected_offset == len(data) - len(index_bytes)
    return [data[o : o + nb] for o, nb in entries]


# ---------------------------------------------------------------------------------- codec


def test_jpeg_encoding_is_deterministic() -> None:
    patch = textured_patch(1)
    assert len({encode_patch(patch.copy(), 90) for _ in range(5)}) == 1
    assert encode_patch(patch, 90) != encode_patch(patch, 80)


def test_codec_dict_roundtrip_and_registry() -> None:
    codec = JpegCodec(quality=85, subsampling="444")
    assert codec.to_dict() == {
        "name": "histmol.jpeg",
        "configuration": {"quality": 85, "subsampling": "444"},
    }
    assert JpegCodec.from_dict(codec.to_dict()) == codec
    assert JpegCodec.from_dict({"name": "histmol.jpeg"}) == JpegCodec()
    assert get_codec_class("histmol.jpeg") is JpegCodec
    with pytest.raises(ValueError, match="quality"):
        JpegCodec(quality=0)
    with pytest.raises(ValueError, match="subsampling"):
        JpegCodec(subsampling="411")


def test_codec_roundtrips_through_zarr_python(tmp_path: Path) -> None:
    data = np.stack([textured_patch(i) for i in range(3)])
    array = zarr.create_array(
        tmp_path / "plain.zarr", shape=data.shape, dtype="uint8", chunks=(1, PX, PX, 3),
        serializer=JpegCodec(quality=95), compressors=None, filters=None, fill_value=0,
    )
    array[:] = data
    back = zarr.open_array(tmp_path / "plain.zarr", mode="r")[:]
    assert back.shape == data.shape
    assert np.abs(back.astype(int) - data).mean() < 3
    for i in range(3):
        chunk = (tmp_path / "plain.zarr" / "c" / str(i) / "0" / "0" / "0").read_bytes()
        assert chunk == encode_patch(data[i], 95)


# ---------------------------------------------------------------------------------- writer


def test_zarr_python_reads_every_patch_of_a_written_part(tmp_path: Path) -> None:
    records = write_section(tmp_path / "s", 6, pairs_per_shard=8)
    assert len(records) == 1
    part = tmp_path / "s" / records[0].images_path
    array = zarr.open_array(part, mode="r")
    assert array.shape == (6, PX, PX, 3) and array.dtype == np.uint8
    assert array.chunks == (1, PX, PX, 3) and array.shards == (6, PX, PX, 3)
    jpegs = parse_shard_by_hand(part / "c" / "0" / "0" / "0" / "0", 6)
    for i in range(6):
        patch = array[i]
        assert np.array_equal(patch, decode_patch(jpegs[i]))
        assert np.abs(patch.astype(int) - textured_patch(i)).mean() < 3


def test_shard_bytes_equal_what_zarr_python_writes(tmp_path: Path) -> None:
    records = write_section(tmp_path / "s", 5, pairs_per_shard=8)
    ours = tmp_path / "s" / records[0].images_path
    data = np.stack([textured_patch(i) for i in range(5)])
    theirs = tmp_path / "zarr-written.zarr"
    array = zarr.create_array(
        theirs, shape=data.shape, dtype="uint8", chunks=(1, PX, PX, 3), shards=data.shape,
        serializer=JpegCodec(), compressors=None, filters=None, fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "/"},
        dimension_names=("pair", "y", "x", "channel"),
    )
    array[:] = data
    assert all_files(ours) == all_files(theirs)


def test_index_layout_matches_the_sharding_spec(tmp_path: Path) -> None:
    records = write_section(tmp_path / "s", 3, pairs_per_shard=8)
    part = tmp_path / "s" / records[0].images_path
    meta = json.loads((part / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["index_location"] == "end"
    assert sharding["configuration"]["index_codecs"] == [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "crc32c"},
    ]
    assert sharding["configuration"]["codecs"] == [JpegCodec().to_dict()]
    jpegs = parse_shard_by_hand(part / "c/0/0/0/0", 3)
    for i, jpeg in enumerate(jpegs):
        assert jpeg == encode_patch(textured_patch(i), 90)


def test_records_digest_definition(tmp_path: Path) -> None:
    import hashlib

    record = write_section(tmp_path / "s", 3, pairs_per_shard=8)[0]
    part = tmp_path / "s" / record.images_path
    shard, meta = (part / "c/0/0/0/0").read_bytes(), (part / "zarr.json").read_bytes()
    assert record.images_sha256 == hashlib.sha256(shard + meta).hexdigest()
    assert record.images_bytes == len(shard) + len(meta)
    units = (tmp_path / "s" / record.units_path).read_bytes()
    assert record.units_sha256 == hashlib.sha256(units).hexdigest()
    assert record.units_bytes == len(units)


def test_two_writes_of_the_same_input_are_byte_identical(tmp_path: Path) -> None:
    first = write_section(tmp_path / "a", 7, pairs_per_shard=3)
    second = write_section(tmp_path / "b", 7, pairs_per_shard=3)
    assert first == second
    files = all_files(tmp_path / "a")
    assert files == all_files(tmp_path / "b")
    assert not [name for name in files if ".tmp-" in name]


def test_parts_split_exactly_at_pairs_per_shard(tmp_path: Path) -> None:
    records = write_section(tmp_path / "s", 5, pairs_per_shard=2)
    assert [r.n_pairs for r in records] == [2, 2, 1]
    assert [r.part for r in records] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        f"part-0000{i}.{ext}" for i in range(3) for ext in ("parquet", "zarr")
    ]
    for record, first_pair in zip(records, (0, 2, 4), strict=True):
        with ShardReader(tmp_path / "s" / record.images_path) as reader:
            assert reader.n_pairs == record.n_pairs
            assert reader.read_jpeg(0) == encode_patch(textured_patch(first_pair), 90)


def test_units_parquet_round_trip(tmp_path: Path) -> None:
    records = write_section(tmp_path / "s", 5, pairs_per_shard=2)
    table = pq.read_table(tmp_path / "s" / records[1].units_path)
    assert pq.ParquetFile(tmp_path / "s" / records[1].units_path).num_row_groups == 1
    assert table.column_names == ["pair_index", "unit_id", "x_in_patch_px", "gene_idx", "counts"]
    assert table.schema.field("pair_index").type == pa.int32()
    assert table.schema.field("gene_idx").type == pa.list_(pa.int32())
    assert table.schema.field("counts").type == pa.list_(pa.int32())
    expected = [units_for(2), units_for(3)]  # part 1 holds pairs 2 and 3
    assert table.num_rows == records[1].n_units == sum(len(u["unit_id"]) for u in expected)
    assert table.column("pair_index").to_pylist() == [
        p for p, u in enumerate(expected) for _ in u["unit_id"]
    ]
    assert table.column("unit_id").to_pylist() == [x for u in expected for x in u["unit_id"]]
    gene_idx = table.column("gene_idx").combine_chunks()
    assert gene_idx.values.to_numpy().tolist() == [
        v for u in expected for a in u["gene_idx"] for v in a.tolist()
    ]


def test_units_stream_out_in_row_groups_of_whole_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dense part is written a row group at a time, never held whole; the rows are unchanged."""
    whole = write_section(tmp_path / "whole", 9, pairs_per_shard=9)
    monkeypatch.setattr("histmol.shards.shard_writer.ROW_GROUP_UNITS", 4)
    streamed = write_section(tmp_path / "streamed", 9, pairs_per_shard=9)
    units = pq.ParquetFile(tmp_path / "streamed" / streamed[0].units_path)
    # pairs hold 1, 2, 3, 1, 2, 3, ... units: a group closes once >= 4 units are buffered
    sizes = [units.metadata.row_group(i).num_rows for i in range(units.num_row_groups)]
    assert sizes == [6, 6, 6]
    groups = [units.read_row_group(i).column("pair_index").to_pylist() for i in range(3)]
    assert groups == [[0, 1, 1, 2, 2, 2], [3, 4, 4, 5, 5, 5], [6, 7, 7, 8, 8, 8]]
    got = pq.read_table(tmp_path / "streamed" / streamed[0].units_path)
    assert got.equals(pq.read_table(tmp_path / "whole" / whole[0].units_path))
    assert streamed[0].n_units == whole[0].n_units == 18
    assert streamed[0].images_sha256 == whole[0].images_sha256
    again = write_section(tmp_path / "again", 9, pairs_per_shard=9)
    assert again == streamed and all_files(tmp_path / "again") == all_files(tmp_path / "streamed")


def test_units_as_tables_and_schema_mismatch(tmp_path: Path) -> None:
    schema = pa.schema([("unit_id", pa.string()), ("counts", pa.list_(pa.int32()))])
    table = pa.table({"unit_id": ["a"], "counts": [[1, 2]]}, schema=schema)
    with pytest.raises(ValueError, match="'counts'"):
        with SectionShardWriter(tmp_path / "s", patch_px=PX) as writer:
            writer.add_pair(textured_patch(0), table)
            writer.add_pair(textured_patch(1), {"unit_id": ["b"], "counts": [["x"]]})
    with pytest.raises(ValueError, match="'extra'"):
        with SectionShardWriter(tmp_path / "s", patch_px=PX) as writer:
            writer.add_pair(textured_patch(0), table)
            writer.add_pair(textured_patch(1), table.append_column("extra", pa.array([1])))
    with pytest.raises(ValueError, match="'pair_index'"):
        with SectionShardWriter(tmp_path / "s", patch_px=PX) as writer:
            writer.add_pair(textured_patch(0), {"pair_index": [0]})
    with SectionShardWriter(tmp_path / "s", patch_px=PX) as writer:
        writer.add_pair(textured_patch(0), table)
        writer.add_pair(textured_patch(1), {"counts": [[]], "unit_id": ["b"]})  # order, empty
        writer.add_pair(textured_patch(2), table.slice(0, 0))  # a pair without units
    out = pq.read_table(tmp_path / "s" / writer.records[0].units_path)
    assert out.column("pair_index").to_pylist() == [0, 1]
    assert out.column("counts").to_pylist() == [[1, 2], []]
    assert writer.records[0].n_pairs == 3


def test_writer_validates_arguments_up_front(tmp_path: Path) -> None:
    for kwargs in ({"patch_px": 0}, {"patch_px": PX, "pairs_per_shard": 0},
                   {"patch_px": PX, "jpeg_quality": 101}, {"patch_px": 2.5}):
        with pytest.raises(ConfigError):
            SectionShardWriter(tmp_path / "s", **kwargs)  # type: ignore[arg-type]
    with SectionShardWriter(tmp_path / "s", patch_px=PX) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.add_pair(textured_patch(0).astype(np.float32), units_for(0))
        with pytest.raises(ValueError, match=r"\(64, 64, 3\)"):
            writer.add_pair(textured_patch(0, px=32), units_for(0))
    assert writer.records == []
    write_section(tmp_path / "t", 1)
    with pytest.raises(CorpusError, match="already holds parts"):
        SectionShardWriter(tmp_path / "t", patch_px=PX)


def test_exception_inside_the_writer_leaves_no_files(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    for section_dir in (tmp_path / "fresh", existing):
        with pytest.raises(RuntimeError, match="boom"):
            with SectionShardWriter(section_dir, patch_px=PX, pairs_per_shard=2) as writer:
                for i in range(3):  # one finished part plus one open part
                    writer.add_pair(textured_patch(i), units_for(i))
                assert len(writer.records) == 1
                raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]


def test_empty_writer_writes_nothing(tmp_path: Path) -> None:
    with SectionShardWriter(tmp_path / "s", patch_px=PX) as writer:
        pass
    assert writer.close() == []
    assert list((tmp_path / "s").iterdir()) == []


# ---------------------------------------------------------------------------------- reader


def test_reader_returns_the_bytes_zarr_stores(tmp_path: Path) -> None:
    records = write_section(tmp_path / "s", 5, pairs_per_shard=8)
    part = tmp_path / "s" / records[0].images_path
    by_hand = parse_shard_by_hand(part / "c/0/0/0/0", 5)
    reader = ShardReader(part)
    assert len(reader) == reader.n_pairs == 5 and reader.patch_px == PX
    assert list(reader.iter_jpegs()) == by_hand
    array = zarr.open_array(part, mode="r")
    for i in range(5):
        assert np.array_equal(reader.read_patch(i), array[i])
    with pytest.raises(IndexError):
        reader.read_jpeg(5)
    import pickle

    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_jpeg(4) == by_hand[4]
    reader.close()
    clone.close()


def test_reader_reads_a_shard_written_by_zarr_python(tmp_path: Path) -> None:
    data = np.stack([textured_patch(i) for i in range(4)])
    path = tmp_path / "z.zarr"
    array = zarr.create_array(
        path, shape=data.shape, dtype="uint8", chunks=(1, PX, PX, 3), shards=data.shape,
        serializer=JpegCodec(), compressors=None, filters=None, fill_value=0,
    )
    array[:] = data
    with ShardReader(path) as reader:
        assert [reader.read_jpeg(i) for i in range(4)] == [encode_patch(p, 90) for p in data]


@pytest.mark.parametrize("damage", ["flip_index", "flip_crc", "truncate", "truncate_to_tiny"])
def test_corrupt_shards_raise_corpus_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    records = write_section(tmp_path / "s", 4, pairs_per_shard=8)
    shard = tmp_path / "s" / records[0].images_path / "c/0/0/0/0"
    data = bytearray(shard.read_bytes())
    if damage == "flip_index":
        data[-10] ^= 0x01
    elif damage == "flip_crc":
        data[-1] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = data[:10]
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=re.escape(str(shard))):
        ShardReader(tmp_path / "s" / records[0].images_path)


def test_reader_rejects_missing_or_foreign_metadata(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="zarr.json"):
        ShardReader(tmp_path / "nothing.zarr")
    records = write_section(tmp_path / "s", 2, pairs_per_shard=8)
    part = tmp_path / "s" / records[0].images_path
    meta = json.loads((part / "zarr.json").read_text())
    meta["data_type"] = "uint16"
    (part / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CorpusError, match="uint8"):
        ShardReader(part)
    meta["data_type"] = "uint8"
    (part / "zarr.json").write_text(json.dumps(meta))
    (part / "c/0/0/0/0").unlink()
    with pytest.raises(CorpusError, match="missing"):
        ShardReader(part)


# ---------------------------------------------------------------------------------- atomic


def test_atomic_writes_leave_no_temporaries(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"one")
    atomic_write_bytes(tmp_path / "a.bin", b"two")
    atomic_write_json(tmp_path / "b.json", {"z": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"two"
    assert (tmp_path / "b.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "z": 1\n}\n'
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "d") as tmp:
            assert tmp.name.startswith(".d.tmp-")
            (tmp / "f").write_bytes(b"x")
            raise RuntimeError
    with atomic_directory(tmp_path / "e") as tmp:
        (tmp / "f").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        with atomic_directory(tmp_path / "e"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "e"]
    assert (tmp_path / "e" / "f").read_bytes() == b"x"


def test_a_fresh_process_reads_a_part_through_the_entry_point(tmp_path: Path) -> None:
    import subprocess
    import sys

    records = write_section(tmp_path / "s", 2, pairs_per_shard=8)
    part = tmp_path / "s" / records[0].images_path
    code = (
        "import sys, zarr\n"
        "assert 'histmol' not in sys.modules\n"
        f"a = zarr.open_array({str(part)!r}, mode='r')\n"
        "print(a.shape, int(a[1].sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = int(decode_patch(encode_patch(textured_patch(1))).astype(np.int64).sum())
    assert done.stdout.split() == ["(2,", f"{PX},", f"{PX},", "3)", str(expected)]


def test_reader_handles_an_index_at_the_shard_start(tmp_path: Path) -> None:
    from zarr.codecs import ShardingCodec

    data = np.stack([textured_patch(i) for i in range(3)])
    path = tmp_path / "start.zarr"
    array = zarr.create_array(
        path, shape=data.shape, dtype="uint8", chunks=data.shape, compressors=None, filters=None,
        serializer=ShardingCodec(chunk_shape=(1, PX, PX, 3), codecs=[JpegCodec()],
                                 index_location="start"),
        fill_value=0,
    )
    array[:] = data
    assert json.loads((path / "zarr.json").read_text())["codecs"][0]["configuration"][
        "index_location"] == "start"
    with ShardReader(path) as reader:
        assert [reader.read_jpeg(i) for i in range(3)] == [encode_patch(p) for p in data]


def test_package_exports_are_exactly_all_and_resolve_to_the_defining_modules() -> None:
    import histmol.shards
    from histmol.shards.corpus import Corpus

    assert list(histmol.shards._EXPORTS) == histmol.shards.__all__
    exported = [getattr(histmol.shards, name) for name in histmol.shards.__all__]
    expected = [Corpus, JpegCodec, SectionShardWriter, ShardReader, ShardRecord, decode_patch,
                encode_patch]
    assert all(a is b for a, b in zip(exported, expected, strict=True))
