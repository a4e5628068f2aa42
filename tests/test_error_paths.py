"""Errors name their file: bad transforms, a full disk and refused permissions during writes."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from histmol.errors import RegistrationError
from histmol.registration import read_transform_csv
from histmol.shards import atomic, shard_writer
from histmol.shards.atomic import atomic_write_bytes, atomic_write_parquet, naming_path
from histmol.shards.commit_record import write_table
from histmol.shards.corpus import Corpus
from histmol.shards.shard_writer import SectionShardWriter

PX = 32


@pytest.mark.parametrize(("rows", "why"), [
    ("1,0,0\n0,0,0\n0,0,1\n", "transform is singular"),
    ("1,0,0\n0,nan,0\n0,0,1\n", "transform must be a finite 3x3 matrix"),
    ("1,0,0\n0,1,0\n0.001,0,1\n", "transform is not affine"),
])
def test_bad_transforms_name_their_file(tmp_path: Path, rows: str, why: str) -> None:
    path = tmp_path / "native_to_wsi.csv"
    path.write_text(rows)
    with pytest.raises(RegistrationError, match=rf"^{path}: {why}"):
        read_transform_csv(path)


def _failing_fsync(error: int) -> object:
    def fsync(fd: int) -> None:
        raise OSError(error, os.strerror(error))  # as the kernel reports it: no file name
    return fsync


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EDQUOT])
def test_write_errors_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    code: int) -> None:
    corpus = Corpus.open(tmp_path / "corpus", create=True)
    monkeypatch.setattr(os, "fsync", _failing_fsync(code))
    target = tmp_path / "x.bin"
    with pytest.raises(OSError, match=rf"\[Errno {code}\] .*: '{target}'") as err:
        atomic_write_bytes(target, b"data")
    assert err.value.errno == code and err.value.filename == str(target)
    assert (code == errno.EACCES) == isinstance(err.value, PermissionError)
    assert not list(tmp_path.glob(".x.bin.tmp-*"))  # nothing half-written left
    monkeypatch.setattr(atomic, "fsync_path", lambda path: os.fsync(0))
    table = corpus.read_table("genes")
    with pytest.raises(OSError, match=rf"'{tmp_path / 'y.parquet'}'"):
        atomic_write_parquet(tmp_path / "y.parquet", table)
    manifest = tmp_path / "corpus" / "manifest.parquet"
    with pytest.raises(OSError, match=rf"'{tmp_path / 'corpus' / 'commit.json'}'"):
        write_table(manifest, table)  # the record is the first file a table write touches


def test_shard_writer_names_the_part_on_a_full_disk(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_writer.os, "fsync", _failing_fsync(errno.ENOSPC))
    patch = np.zeros((PX, PX, 3), np.uint8)
    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path}/part-00000.zarr'"):
        with SectionShardWriter(tmp_path, patch_px=PX, pairs_per_shard=2) as writer:
            writer.add_pair(patch, {"unit_id": ["u"], "gene_idx": [np.array([0], np.int32)],
                                    "counts": [np.array([1], np.int32)]})
            writer.add_pair(patch, {"unit_id": ["v"], "gene_idx": [np.array([0], np.int32)],
                                    "counts": [np.array([1], np.int32)]})
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the writer removed its files


def test_an_error_that_names_a_file_already_is_kept() -> None:
    with pytest.raises(FileNotFoundError) as err, naming_path("/elsewhere"):
        open("/nonexistent/file")  # noqa: SIM115
    assert err.value.filename == "/nonexistent/file"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs the right to mount: skipped elsewhere)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_names_the_part(tiny_disk: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(OSError, match=rf"No space left on device: '{tiny_disk}/part-0000\d"):
        with SectionShardWriter(tiny_disk, patch_px=224, pairs_per_shard=4) as writer:
            for i in range(200):  # ~40 kB of noise JPEG each: far more than 256 KiB
                writer.add_pair(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8), {
                    "unit_id": [f"u{i}"], "gene_idx": [np.array([0], np.int32)],
                    "counts": [np.array([1], np.int32)]})
    assert [p.name for p in tiny_disk.iterdir()] == []
