"""PairDataset: sample content, gene sets, partitions over ranks x workers, sources, integrity."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import (
    DEFAULT_SECTIONS,
    ENSEMBL,
    PX,
    SYMBOL,
    expected_units,
    make_corpus,
    patch_value,
    tokens,
    unit_position,
)
from torchdata.stateful_dataloader import StatefulDataLoader

from histmol.data import GENE_STATS, PairDataset, pair_collate, to_float_chw
from histmol.data.genes import TARGET_SUM
from histmol.errors import ConfigError, CorpusError
from histmol.shards.corpus import Corpus

PAIRS_PER_SHARD = 4
TOTAL = sum(s.n_pairs for s in DEFAULT_SECTIONS)
SPEC = {s.section_id: (i, s) for i, s in enumerate(DEFAULT_SECTIONS)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data") / "corpus", pairs_per_shard=PAIRS_PER_SHARD)


def key(sample: dict) -> tuple[str, int]:
    return sample["section_id"], sample["part"] * PAIRS_PER_SHARD + sample["pair_index"]


def dense(spec, pair: int, genes: list[str]) -> np.ndarray:
    units = expected_units(spec, pair)
    return np.array([[u.get(g, 0) for g in genes] for u in units], dtype=np.float32)


def test_samples_hold_exact_patch_expression_positions_and_panel(corpus: Path) -> None:
    ds = PairDataset(corpus, seed=3, batch_size=4)
    genes = tokens(ds.genes["gene_id"].tolist())
    assert genes == [f"g{i}" for i in range(8)] and ds.epoch_length == TOTAL
    seen = set()
    for sample in ds:
        index, spec = SPEC[sample["section_id"]]
        pair = key(sample)[1]
        seen.add(key(sample))
        assert sample["patch"].shape == (PX, PX, 3) and sample["patch"].dtype == np.uint8
        assert np.abs(sample["patch"].astype(int) - patch_value(index, pair)).max() <= 1
        assert np.array_equal(sample["expression"], dense(spec, pair, genes))
        assert sample["n_units"] == spec.units_per_pair
        assert sample["positions"].tolist() == [list(unit_position(pair, u))
                                                for u in range(spec.units_per_pair)]
        assert sample["panel_mask"].tolist() == [g in spec.genes for g in genes]
        assert (sample["platform"], sample["tissue"]) == (spec.platform, spec.tissue)
    assert len(seen) == TOTAL


def test_aggregation_gene_list_and_float_patches(corpus: Path) -> None:
    ds = PairDataset(corpus, genes=[ENSEMBL["g6"], SYMBOL["g2"], ENSEMBL["g0"]],
                     aggregate_units=True,
                     patch_format="float_chw", shuffle="none", batch_size=2)
    assert tokens(ds.genes["gene_id"].tolist()) == ["g6", "g2", "g0"]
    samples = list(ds)
    for sample in samples:
        index, spec = SPEC[sample["section_id"]]
        pair = key(sample)[1]
        assert np.array_equal(sample["expression"], dense(spec, pair, ["g6", "g2", "g0"]).sum(0))
        assert "positions" not in sample
        patch = sample["patch"]
        assert patch.shape == (3, PX, PX) and patch.dtype == torch.float32
        assert torch.allclose(patch, torch.full_like(patch, patch_value(index, pair) / 255),
                              atol=1.5 / 255)
    batch = pair_collate(samples[:5])
    assert batch["expression"].shape == (5, 3) and batch["patch"].shape == (5, 3, PX, PX)
    assert "unit_batch" not in batch
    with pytest.raises(ConfigError, match=r"'nope' \(unknown\)"):
        PairDataset(corpus, genes=[ENSEMBL["g1"], "nope"])


def test_collate_concatenates_units(corpus: Path) -> None:
    ds = PairDataset(corpus, shuffle="none", batch_size=4)
    samples = [s for s in ds if s["section_id"] == "s-hd"][:3]  # 3 units each
    batch = pair_collate(samples)
    assert batch["patch"].shape == (3, PX, PX, 3) and batch["patch"].dtype == torch.uint8
    assert batch["expression"].shape == (9, 8) and batch["positions"].shape == (9, 2)
    assert batch["unit_batch"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch["n_units"].tolist() == [3, 3, 3] and batch["panel_mask"].dtype == torch.bool
    assert batch["section_id"] == ["s-hd"] * 3


def test_hvg_matches_direct_computation_and_is_cached(corpus: Path, monkeypatch) -> None:
    cache = corpus / GENE_STATS
    if cache.exists():
        cache.unlink()
    ds = PairDataset(corpus, genes="hvg:3")
    # Direct: log1p(count / unit total * 1e4) over the units of sections whose panel has the gene.
    values: dict[str, list[float]] = {}
    for spec in DEFAULT_SECTIONS:
        for pair in range(spec.n_pairs):
            for unit in expected_units(spec, pair):
                total = sum(unit.values())
                for gene in spec.genes:
                    values.setdefault(gene, []).append(
                        np.log1p(unit.get(gene, 0) / total * TARGET_SUM) if total else 0.0)
    variance = {g: np.var(v) for g, v in values.items()}
    expected = sorted(variance, key=lambda g: (-variance[g], int(g[1:])))[:3]
    assert tokens(ds.genes["gene_id"].tolist()) == expected
    stats = pq.read_table(cache)
    assert stats.column("index").to_pylist()[:2] == [0, 1]  # stable indices of g0, g1
    assert stats.column("n_units").to_pylist()[:2] == [len(values["g0"]), len(values["g1"])]
    monkeypatch.setattr("histmol.data.genes.compute_gene_stats",
                        lambda source: pytest.fail("recomputed despite the cache"))
    assert tokens(PairDataset(corpus, genes="hvg:3").genes["gene_id"].tolist()) == expected
    with pytest.raises(ConfigError, match="measured 8"):
        PairDataset(corpus, genes="hvg:9")


def test_gene_stats_are_recomputed_when_the_manifest_changes(corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    PairDataset(copy, genes="hvg:2")
    before = pq.read_table(copy / GENE_STATS)
    with Corpus.open(copy) as handle:
        handle.remove_section("s-visium")
    PairDataset(copy, genes="hvg:2")
    after = pq.read_table(copy / GENE_STATS)
    manifest = hashlib.sha256((copy / "manifest.parquet").read_bytes()).hexdigest()
    assert set(after.column("manifest_sha256").to_pylist()) == {manifest}
    assert after.column("n_units").to_pylist()[1] == 0  # g1: only s-visium measured it
    assert before.column("n_units").to_pylist()[1] == 10


def loader_keys(corpus: Path, world: int, workers: int, **kw) -> list[list[tuple[str, int]]]:
    out = []
    for rank in range(world):
        ds = PairDataset(corpus, seed=5, batch_size=3, rank=rank, world_size=world, **kw)
        loader = StatefulDataLoader(ds, batch_size=3, num_workers=workers,
                                    collate_fn=pair_collate)
        keys = []
        for batch in loader:
            keys += [(s, p * PAIRS_PER_SHARD + i) for s, p, i in
                     zip(batch["section_id"], batch["part"].tolist(), batch["pair_index"].tolist(),
                         strict=True)]
        out.append(keys)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_pair_once_per_epoch_over_ranks_and_workers(corpus: Path, world: int) -> None:
    reference = None
    for workers in (0, 1, 2, 3):
        per_rank = loader_keys(corpus, world, workers)
        flat = [k for keys in per_rank for k in keys]
        assert len(flat) == TOTAL and len(set(flat)) == TOTAL, (world, workers)
        if reference is None:
            reference = per_rank
        assert per_rank == reference  # worker count changes nothing about what a rank sees


def test_order_follows_seed_and_epoch(corpus: Path) -> None:
    ds = PairDataset(corpus, seed=1, batch_size=2)
    first = [s["index"] for s in ds]
    assert ds.epoch == 1  # a completed in-process pass moves on
    second = [s["index"] for s in ds]
    ds.set_epoch(0)
    assert [s["index"] for s in ds] == first
    assert sorted(first) == sorted(second) and first != second
    assert [s["index"] for s in PairDataset(corpus, seed=2, batch_size=2)] != first


def test_mixing_by_platform_meets_the_weights_in_every_batch(corpus: Path) -> None:
    weights = {"visium": 0.5, "visium-hd": 0.3, "xenium": 0.2}
    ds = PairDataset(corpus, mix={"platform": weights}, epoch_size=100, batch_size=10, seed=4)
    platforms = [s["platform"] for s in ds]
    assert Counter(platforms) == {"visium": 50, "visium-hd": 30, "xenium": 20}
    for lo in range(0, 100, 10):
        batch = Counter(platforms[lo:lo + 10])
        for name, weight in weights.items():
            assert abs(batch[name] - 10 * weight) <= 2
    left_out = PairDataset(corpus, mix={"tissue": {"colon": 1, "lung": 0}}, batch_size=4)
    assert {s["tissue"] for s in left_out} == {"colon"} and left_out.epoch_length == 17
    with pytest.raises(ConfigError, match="no weight for"):
        PairDataset(corpus, mix={"platform": {"visium": 1}})
    with pytest.raises(ConfigError, match="one key of"):
        PairDataset(corpus, mix={"species": {"human": 1}})


def copy_to_memory(corpus: Path, url: str) -> None:
    fs = fsspec.filesystem("memory")
    for path in corpus.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            fs.pipe_file(f"{url}/{path.relative_to(corpus)}", path.read_bytes())


def test_memory_filesystem_source_matches_local(corpus: Path, tmp_path: Path) -> None:
    copy_to_memory(corpus, "memory://remote-corpus")
    local = [(s["index"], s["patch"].tobytes(), s["expression"].tobytes())
             for s in PairDataset(corpus, seed=9, batch_size=2)]
    remote_ds = PairDataset("memory://remote-corpus", seed=9, batch_size=2, cache_dir=tmp_path)
    remote = [(s["index"], s["patch"].tobytes(), s["expression"].tobytes()) for s in remote_ds]
    assert remote == local
    cached = sorted(p.name for p in tmp_path.rglob("part-*"))
    assert len(cached) == 2 * 7  # 7 parts: a .zarr folder and a .parquet each
    # Two corpora at once: the same pairs twice, ids offset by the first corpus' size.
    both = PairDataset([corpus, "memory://remote-corpus"], batch_size=2, cache_dir=tmp_path)
    indices = sorted(s["index"] for s in both)
    assert indices == list(range(2 * TOTAL)) and tokens(both.genes["gene_id"].tolist())[-1] == "g7"


def corrupt_copy(corpus: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    shard = copy / "shards" / "s-hd" / "part-00001.zarr" / "c" / "0" / "0" / "0" / "0"
    return copy, shard


def test_a_shard_that_disagrees_with_the_manifest_is_named(corpus: Path, tmp_path: Path) -> None:
    copy, shard = corrupt_copy(corpus, tmp_path)
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF  # same length, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"s-hd/part-00001.zarr: sha256 [0-9a-f]{64} disagrees"):
        list(PairDataset(copy, batch_size=2))
    # verify="size" does not hash: the flipped byte lies in a JPEG and decodes or fails by itself.
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(CorpusError, match=r"part-00001.zarr: length \d+ disagrees"):
        list(PairDataset(copy, batch_size=2, verify="size"))


def test_corrupt_parts_can_be_skipped_and_counted(corpus: Path, tmp_path: Path) -> None:
    copy, shard = corrupt_copy(corpus, tmp_path)
    units = copy / "shards" / "s-visium" / "part-00000.parquet"
    units.write_bytes(units.read_bytes() + b"x")
    shard.unlink()
    ds = PairDataset(copy, batch_size=2, on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping corrupt part"):
        samples = list(ds)
    assert ds.skipped_samples == 3 + 4  # s-hd part 1 (3 pairs), s-visium part 0 (4 pairs)
    assert len(samples) == TOTAL - 7 and ds.state_dict()["skipped"] == 7
    assert not any(s["section_id"] == "s-hd" and s["part"] == 1 for s in samples)


def test_bad_options_are_refused(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        PairDataset(corpus, batch_size=0)
    with pytest.raises(ConfigError, match="rank and world_size"):
        PairDataset(corpus, rank=0)
    with pytest.raises(ConfigError, match="shuffle"):
        PairDataset(corpus, shuffle="random")
    with pytest.raises(ConfigError, match="patch_format"):
        PairDataset(corpus, patch_format="png")
    with pytest.raises(CorpusError, match="not a histmol corpus"):
        PairDataset(tmp_path)


def test_files_open_lazily_and_nothing_is_left_in_shared_memory(corpus: Path) -> None:
    ds = PairDataset(corpus, batch_size=2, max_open_parts=2)
    assert ds._open == {} and ds._fetcher is None  # construction reads only the tables
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    it = iter(ds)
    for _ in range(TOTAL):
        next(it)
        assert len(ds._open) <= 2
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after <= before


def test_images_are_hashed_once_per_file_version(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    copy, shard = corrupt_copy(corpus, tmp_path / "c")
    cache = tmp_path / "cache"
    assert len(list(PairDataset(copy, batch_size=2, cache_dir=cache))) == TOTAL
    assert len(list((cache / "verified").iterdir())) == 7  # one marker per part
    hashed = []
    real = "histmol.data.fetch._hash_file"
    monkeypatch.setattr(real, lambda path, digest: hashed.append(path) or 0)
    assert len(list(PairDataset(copy, batch_size=2, cache_dir=cache))) == TOTAL
    assert hashed == []  # another process on this machine trusts the markers
    monkeypatch.undo()
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))  # a new file version: its marker no longer applies
    with pytest.raises(CorpusError, match="sha256 .* disagrees"):
        list(PairDataset(copy, batch_size=2, cache_dir=cache))


def test_collate_in_a_worker_writes_shared_memory_with_the_same_values(
    corpus: Path, monkeypatch
) -> None:
    samples = [s for _, s in zip(range(6), PairDataset(corpus, batch_size=6), strict=False)]
    floats = [dict(s, patch=torch.from_numpy(s["patch"]).permute(2, 0, 1).float())
              for s in samples]
    here = pair_collate(samples), pair_collate(floats)
    monkeypatch.setattr("histmol.data.collate.get_worker_info", lambda: object())
    there = pair_collate(samples), pair_collate(floats)
    for a, b in zip(here, there, strict=True):
        assert b["patch"].is_shared() and b["panel_mask"].is_shared()
        for name in ("patch", "panel_mask", "expression", "positions", "unit_batch"):
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_package_exports_are_exactly_all_and_resolve_to_the_defining_modules() -> None:
    import histmol.data
    from histmol.data.genes import GeneSet, resolve_genes

    assert list(histmol.data._EXPORTS) == histmol.data.__all__
    exported = [getattr(histmol.data, name) for name in histmol.data.__all__]
    expected = [GENE_STATS, GeneSet, PairDataset, pair_collate, resolve_genes, to_float_chw]
    assert all(a is b for a, b in zip(exported, expected, strict=True))
