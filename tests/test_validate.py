"""`validate_corpus` finds every problem in a damaged corpus, and none in a sound one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from qc_corpus import QcCorpus, shared_qc_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.shards.commit_record import write_table
from histmol.validate import Problem, validate_corpus

IMAGES = "shards/crc-01/part-00000.zarr"
UNITS = "shards/crc-02/part-00000.parquet"


@pytest.fixture(scope="session")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


def test_a_sound_corpus_has_no_problems(qc: QcCorpus) -> None:
    assert validate_corpus(qc.root) == []
    result = CliRunner().invoke(app, ["validate", str(qc.root)])
    assert result.exit_code == 0 and "no problems found" in result.output


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_units(path: Path) -> int:
    """Negative count in unit 0, an unknown gene in unit 1, the last pair's only unit moved to
    pair 500; returns that pair."""
    table = pq.read_table(path)
    counts = table.column("counts").to_pylist()
    genes = table.column("gene_idx").to_pylist()
    pairs = table.column("pair_index").to_pylist()
    assert pairs.count(pairs[-1]) == 1
    last = pairs[-1]
    counts[0][0] = -5
    genes[1][0] = 999999  # no gene has this stable index
    pairs[-1] = 500
    columns = {
        "counts": pa.array(counts, pa.list_(pa.int32())),
        "gene_idx": pa.array(genes, pa.list_(pa.int32())),
        "pair_index": pa.array(pairs, pa.int32()),
    }
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), name, values)
    pq.write_table(table, path)
    return last


def test_every_problem_is_reported(qc: QcCorpus, tmp_path: Path) -> None:
    root = qc.copy(tmp_path / "corpus")
    flip_byte(root / IMAGES / "c" / "0" / "0" / "0" / "0", 1000)  # inside a JPEG, not the index
    emptied = damage_units(root / UNITS)
    (root / "shards" / "st-01" / "part-00000.parquet").unlink()
    (root / "shards" / "stray").mkdir()
    (root / "shards" / "crc-01" / "part-00007.parquet").write_bytes(b"left over")
    problems = validate_corpus(root)
    assert all(isinstance(p, Problem) for p in problems)
    found = [(p.path, p.message) for p in problems]

    def has(path: str, text: str) -> bool:
        return any(p == path and text in m for p, m in found)

    assert has(IMAGES, "differs from the manifest's")
    assert has(UNITS, "bytes, the manifest says")
    assert has(UNITS, "differs from the manifest's")
    assert has(UNITS, "1 negative counts: -5")
    assert has(UNITS, "1 counts reference genes not in genes.parquet: 999999")
    assert has(UNITS, "1 units point at pairs outside 0..85: 500")
    assert has(UNITS, f"1 pairs hold no unit: {emptied}")
    assert has(UNITS, "units' total_counts differ from the sum of their counts")
    assert has("shards/st-01/part-00000.parquet", "missing (listed in the manifest)")
    assert has("shards/stray", "not referenced by the manifest")
    assert has("shards/crc-01/part-00007.parquet", "not referenced by the manifest")
    assert len(problems) == 11, "\n".join(map(str, problems))
    result = CliRunner().invoke(app, ["validate", str(root)])
    assert result.exit_code == 1 and "11 problem(s)" in result.output


def test_sizes_are_checked_without_checksums(qc: QcCorpus, tmp_path: Path) -> None:
    root = qc.copy(tmp_path / "corpus")
    flip_byte(root / IMAGES / "c" / "0" / "0" / "0" / "0", 1000)
    assert validate_corpus(root, checksums=False) == []  # same size: only a checksum sees it
    pq.write_table(pq.read_table(root / UNITS), root / UNITS, compression="none")  # same rows
    size = (root / UNITS).stat().st_size
    assert [str(p) for p in validate_corpus(root, checksums=False)] == [
        f"{UNITS}: {size} bytes, the manifest says {(qc.root / UNITS).stat().st_size}"
    ]


def test_truncated_shard_and_bad_tables(qc: QcCorpus, tmp_path: Path) -> None:
    root = qc.copy(tmp_path / "corpus")
    shard = root / "shards" / "st-01" / "part-00000.zarr" / "c" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    genes = pq.read_table(root / "genes.parquet")
    write_table(root / "genes.parquet", pa.concat_tables([genes, genes.slice(0, 1)]))
    sections = pq.read_table(root / "sections.parquet")
    n_units = sections.column("n_units").to_pylist()
    n_units[1] += 1  # crc-01
    write_table(
        root / "sections.parquet",
        sections.set_column(
            sections.column_names.index("n_units"), "n_units", pa.array(n_units, pa.int64())
        ),
    )
    messages = [str(p) for p in validate_corpus(root)]
    assert any(m.startswith("genes.parquet: index is not strictly increasing") for m in messages)
    assert any(
        m.startswith("genes.parquet: (gene_id, species) keys repeat: ('ENSG") for m in messages
    )
    assert (
        "sections.parquet: section 'crc-01': n_units 124 but its manifest rows sum to 123"
        in messages
    )
    assert any(
        m.startswith("shards/st-01/part-00000.zarr: ") and "checksum mismatch" in m
        for m in messages
    )
    assert len(messages) == 4, "\n".join(messages)


def test_missing_manifest_column_and_no_corpus(qc: QcCorpus, tmp_path: Path) -> None:
    root = qc.copy(tmp_path / "corpus")
    manifest = pq.read_table(root / "manifest.parquet")
    write_table(root / "manifest.parquet", manifest.drop_columns(["units_sha256"]))
    assert [str(p) for p in validate_corpus(root)] == [
        "manifest.parquet: column 'units_sha256' is missing"
    ]
    shutil.rmtree(root)
    assert [p.path for p in validate_corpus(root)] == ["corpus.json"]
