"""The decoded-units cache: one decode per part per machine, shared by processes, LRU-capped."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from data_helpers import DEFAULT_SECTIONS, make_corpus
from torchdata.stateful_dataloader import StatefulDataLoader

from histmol.data import PairDataset, pair_collate
from histmol.data.units_cache import SUFFIX, UnitsCache
from histmol.errors import ConfigError, CorpusError

TOTAL = sum(s.n_pairs for s in DEFAULT_SECTIONS)
N_PARTS = 7  # 10, 7 and 5 pairs in parts of 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("units-cache") / "corpus", pairs_per_shard=4)


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "units").glob(f"*{SUFFIX}"))


def count_decodes(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Append a line to `log` per decode, in this process and in forked DataLoader workers."""
    import histmol.data.dataset as dataset

    real = dataset.decode_units

    def logged(*args: object) -> pa.Table:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return real(*args)

    monkeypatch.setattr(dataset, "decode_units", logged)


def decodes(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def flatten(batches: list[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """index -> (expression rows, positions) of every sample in per-sample batches."""
    out = {}
    for batch in batches:
        rows = 0
        for i, n in zip(batch["index"].tolist(), batch["n_units"].tolist(), strict=True):
            out[i] = (batch["expression"][rows:rows + n], batch["positions"][rows:rows + n])
            rows += n
    return out


def load(corpus: Path, workers: int = 0, **kw: object) -> list[dict]:
    ds = PairDataset(corpus, seed=3, batch_size=3, batched=True, **kw)
    return list(StatefulDataLoader(ds, batch_size=None, num_workers=workers,
                                   collate_fn=pair_collate))


def test_each_part_is_decoded_once_and_read_back_identically(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uncached = flatten(load(corpus, cache_dir=tmp_path / "none", units_cache_bytes=0))
    assert not (tmp_path / "none" / "units").exists()
    log, cache = tmp_path / "decodes.log", tmp_path / "cache"
    count_decodes(monkeypatch, log)
    first = flatten(load(corpus, cache_dir=cache))
    assert decodes(log) == N_PARTS and len(entries(cache)) == N_PARTS
    again = flatten(load(corpus, cache_dir=cache))  # a new process' dataset: maps, decodes nothing
    assert decodes(log) == N_PARTS
    assert sorted(uncached) == sorted(first) == sorted(again) == list(range(TOTAL))
    for i, (expression, positions) in uncached.items():
        for other in (first, again):
            assert torch.equal(other[i][0], expression) and torch.equal(other[i][1], positions)


def test_workers_wait_for_one_decode_instead_of_repeating_it(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, cache = tmp_path / "decodes.log", tmp_path / "cache"
    count_decodes(monkeypatch, log)
    batches = load(corpus, workers=3, cache_dir=cache)  # every worker reads from every part
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(TOTAL))
    assert decodes(log) == N_PARTS and len(entries(cache)) == N_PARTS


def test_a_changed_units_file_is_checked_again(corpus: Path, tmp_path: Path) -> None:
    copy, cache = tmp_path / "corpus", tmp_path / "cache"
    shutil.copytree(corpus, copy)
    assert len(load(copy, cache_dir=cache)) > 0
    units = copy / "shards" / "s-xenium" / "part-00001.parquet"
    data = bytearray(units.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, other bytes: a new file version
    units.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"s-xenium/part-00001.parquet: sha256 \w+ disagrees"):
        load(copy, cache_dir=cache)


def test_an_unreadable_entry_is_decoded_again(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    want = flatten(load(corpus, cache_dir=cache))
    entry = entries(cache)[0]
    size = entry.stat().st_size
    entry.write_bytes(entry.read_bytes()[: size // 2])  # e.g. a disk that lost the tail
    got = flatten(load(corpus, cache_dir=cache))
    assert entry.stat().st_size == size
    assert all(torch.equal(got[i][0], want[i][0]) for i in want)


def table(n: int) -> pa.Table:
    return pa.table({"v": pa.array(range(n), pa.int64())})


def test_the_least_recently_used_entries_go_when_the_cache_is_full(tmp_path: Path) -> None:
    probe = UnitsCache(tmp_path / "probe", 1 << 30)
    probe.table("p", lambda: table(1000))
    size = (tmp_path / "probe" / f"p{SUFFIX}").stat().st_size
    cache = UnitsCache(tmp_path / "c", 2 * size + size // 2)  # room for two entries
    for key in ("a", "b"):
        cache.table(key, lambda: table(1000))
    past = time.time() - 100
    os.utime(tmp_path / "c" / f"a{SUFFIX}", (past, past))
    os.utime(tmp_path / "c" / f"b{SUFFIX}", (past + 1, past + 1))
    assert cache.table("a", lambda: pytest.fail("a is cached")).column("v")[999].as_py() == 999
    cache.table("c", lambda: table(1000))  # over the cap: b, now the least recently used, goes
    assert sorted(p.name for p in (tmp_path / "c").glob(f"*{SUFFIX}")) == [
        f"a{SUFFIX}", f"c{SUFFIX}"]
    assert not (tmp_path / "c" / "b.lock").exists()


def test_an_unwritable_cache_only_costs_the_decode(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cache = UnitsCache(blocked / "units", 1 << 30)
    assert cache.table("k", lambda: table(3)).num_rows == 3


def test_units_cache_bytes_must_be_a_size(corpus: Path) -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="units_cache_bytes"):
            PairDataset(corpus, units_cache_bytes=bad)
