"""Loader order: shuffles, mixing, epoch order and rank/worker partitions, without any I/O."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from histmol.data.mixing import assign_groups, group_targets, interleave, select
from histmol.data.order import OrderSpec, epoch_order
from histmol.data.partition import assigned, consumed, rank_count
from histmol.data.shuffle import SHUFFLES, get_shuffle
from histmol.errors import ConfigError

SIZES = (5, 3, 8, 1, 6, 4)
STARTS = np.concatenate([[0], np.cumsum(SIZES)])
N = int(STARTS[-1])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def part_of(ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(STARTS, ids, side="right") - 1


def test_none_keeps_manifest_order() -> None:
    ids = np.arange(N)
    assert np.array_equal(SHUFFLES["none"](STARTS, ids, rng(), 4), ids)


def test_shard_shuffle_keeps_parts_contiguous_and_ascending() -> None:
    out = SHUFFLES["shard"](STARTS, np.arange(N), rng(3), 4)
    assert sorted(out.tolist()) == list(range(N))
    parts = part_of(out)
    runs = [k for k, _ in itertools.groupby(parts.tolist())]
    assert sorted(runs) == list(range(len(SIZES)))  # each part exactly one contiguous run
    for p in range(len(SIZES)):
        assert np.array_equal(out[parts == p], np.arange(STARTS[p], STARTS[p + 1]))
    assert runs != list(range(len(SIZES)))  # the part order did move (seed 3)


def test_block_shuffle_permutes_inside_blocks_of_the_shard_order() -> None:
    shard = SHUFFLES["shard"](STARTS, np.arange(N), rng(7), 5)
    block = SHUFFLES["block"](STARTS, np.arange(N), rng(7), 5)  # same seed: same shard order
    assert not np.array_equal(shard, block)
    for lo in range(0, N, 5):
        assert sorted(block[lo:lo + 5].tolist()) == sorted(shard[lo:lo + 5].tolist())


def test_shuffles_keep_repeated_ids() -> None:
    ids = np.sort(np.concatenate([np.arange(N), np.arange(0, N, 3)]))
    for name in SHUFFLES:
        out = SHUFFLES[name](STARTS, ids, rng(1), 4)
        assert np.array_equal(np.sort(out), ids), name


def test_unknown_shuffle_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'block', 'none', 'shard'"):
        get_shuffle("py1e")


def spec(**kw: object) -> OrderSpec:
    base = dict(part_sizes=SIZES, part_group=(0,) * len(SIZES), weights=(1.0,), epoch_size=None,
                shuffle="block", block_size=6, seed=11)
    base.update(kw)
    return OrderSpec(**base)  # type: ignore[arg-type]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a, b = epoch_order(spec(), 0), epoch_order(spec(), 0)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(N))
    assert not np.array_equal(a, epoch_order(spec(), 1))
    assert not np.array_equal(a, epoch_order(spec(seed=12), 0))
    assert np.array_equal(epoch_order(spec(shuffle="none"), 5), np.arange(N))


def test_epoch_size_over_and_under_samples_evenly() -> None:
    over = epoch_order(spec(epoch_size=2 * N + 5), 0)
    counts = np.bincount(over, minlength=N)
    assert len(over) == 2 * N + 5 and set(counts.tolist()) == {2, 3} and (counts == 3).sum() == 5
    under = epoch_order(spec(epoch_size=10), 0)
    assert len(under) == 10 and len(set(under.tolist())) == 10


def test_group_targets_largest_remainder() -> None:
    assert group_targets(np.array([0.5, 0.3, 0.2]), 10).tolist() == [5, 3, 2]
    assert group_targets(np.array([1, 1, 1]), 10).tolist() == [4, 3, 3]
    assert group_targets(np.array([2, 1]), 7).tolist() == [5, 2]  # 4.67 -> 5, 2.33 -> 2
    with pytest.raises(ValueError):
        group_targets(np.array([1.0, 0.0]), 4)


def test_select_spreads_repeats() -> None:
    ids = np.arange(10, 17)
    out = select(ids, 17, rng())
    counts = np.bincount(out - 10)
    assert np.array_equal(out, np.sort(out)) and sorted(counts.tolist()) == [2] * 4 + [3] * 3


def test_interleave_keeps_every_window_within_two_samples_of_the_weights() -> None:
    streams = [np.arange(500), np.arange(1000, 1300), np.arange(2000, 2200)]
    merged = interleave(streams)
    group = np.searchsorted([1000, 2000], merged, side="right")
    assert [merged[group == g].tolist() for g in range(3)] == [s.tolist() for s in streams]
    share = np.array([0.5, 0.3, 0.2])
    prefix = np.stack([np.concatenate([[0], np.cumsum(group == g)]) for g in range(3)])
    for length in (7, 20, 64, 256):
        window = prefix[:, length:] - prefix[:, :-length]
        assert np.abs(window - length * share[:, None]).max() <= 2, length


def test_mixed_epoch_order_meets_the_targets() -> None:
    mixed = spec(part_group=(0, 1, 1, -1, 0, 2), weights=(0.5, 0.3, 0.2), epoch_size=40)
    order = epoch_order(mixed, 2)
    groups = np.array(mixed.part_group)[part_of(order)]
    assert len(order) == 40 and np.bincount(groups).tolist() == [20, 12, 8]
    assert not (part_of(order) == 3).any()  # weight 0: left out


def test_assign_groups_checks_the_weights() -> None:
    values = ["visium", "xenium", "visium", "hd"]
    groups, weights = assign_groups(values, {"visium": 2, "xenium": 1, "hd": 0}, "platform")
    assert groups == (0, 1, 0, -1) and weights == (2.0, 1.0)
    with pytest.raises(ConfigError, match=r"no weight for \['hd'\]"):
        assign_groups(values, {"visium": 1, "xenium": 1}, "platform")
    with pytest.raises(ConfigError, match=r"weights for \['st'\], which no corpus holds"):
        assign_groups(values, {"visium": 1, "xenium": 1, "hd": 1, "st": 1}, "platform")
    with pytest.raises(ConfigError, match="finite numbers"):
        assign_groups(values, {"visium": -1, "xenium": 1, "hd": 1}, "platform")


@pytest.mark.parametrize("n", [0, 1, 7, 24, 25, 61])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_partition_covers_each_sample_once(n: int, world: int, drop_last: bool) -> None:
    b = 4
    for workers in (1, 2, 3):
        taken = []
        for rank in range(world):
            per_rank = [assigned(n, batch_size=b, world_size=world, rank=rank,
                                 num_workers=workers, worker=w, drop_last=drop_last)
                        for w in range(workers)]
            # A DataLoader collects whole batches round-robin over the workers.
            batches = [np.array_split(p, range(b, len(p), b)) if len(p) else [] for p in per_rank]
            sequence = [x for k in range(max(map(len, batches)))
                        for w in range(workers) if k < len(batches[w]) for x in batches[w][k]]
            assert len(sequence) == rank_count(n, batch_size=b, world_size=world, rank=rank,
                                               drop_last=drop_last)
            full = (n // (b * world)) * b * world
            head = [x for x in sequence if x < full]
            assert head == [g * b * world + rank * b + i
                            for g in range(n // (b * world)) for i in range(b)]
            taken.extend(sequence)
        expected = (n // (b * world)) * b * world if drop_last else n
        assert sorted(taken) == list(range(expected))
        if drop_last:
            assert len({rank_count(n, batch_size=b, world_size=world, rank=r, drop_last=True)
                        for r in range(world)}) == 1


def test_consumed_then_repartition_is_exactly_the_rest() -> None:
    n, b = 50, 4
    for world, new_world in itertools.product((1, 2, 3), (1, 2, 3)):
        total = rank_count(n, batch_size=b, world_size=world, rank=0, drop_last=False)
        for k in range(0, 6):
            processed = min(k * b, total)
            done = consumed(n, processed, batch_size=b, world_size=world, rank=0,
                            drop_last=False)
            # A finished rank means a finished epoch; otherwise k steps of every rank.
            assert done == (n if processed == total else min(n, k * b * world))
            first = sorted(x for r in range(world) for x in assigned(
                n, batch_size=b, world_size=world, rank=r)[:k * b])
            if processed < total:
                assert first == list(range(done))
            rest = sorted(done + x for r in range(new_world)
                          for x in assigned(n - done, batch_size=3, world_size=new_world, rank=r))
            assert rest == list(range(done, n))


def test_consumed_of_a_finished_rank_is_the_whole_epoch() -> None:
    total = rank_count(9, batch_size=4, world_size=2, rank=1, drop_last=False)
    assert total == 5  # one full batch of 4, then half of the 1-sample tail rounds to rank 1
    assert consumed(9, total, batch_size=4, world_size=2, rank=1, drop_last=False) == 9
    with pytest.raises(ValueError):
        consumed(9, total + 1, batch_size=4, world_size=2, rank=1, drop_last=False)


def _reference_block_order(starts: np.ndarray, ids: np.ndarray, seed: int, block: int):
    """The block shuffle as first written (one stable sort over all samples), for comparison."""
    rng = np.random.default_rng(seed)
    n_parts = len(starts) - 1
    rank = np.empty(n_parts, dtype=np.int64)
    rank[rng.permutation(n_parts)] = np.arange(n_parts)
    part = np.searchsorted(starts, ids, side="right") - 1
    ordered = ids[np.argsort(rank[part], kind="stable")]
    keys = rng.random(len(ordered))
    blocks = np.arange(len(ordered)) // block
    return ordered[np.lexsort((keys, blocks))]


@pytest.mark.parametrize("seed", range(6))
def test_fast_block_and_shard_orders_equal_the_sort_based_ones(seed: int) -> None:
    from histmol.data.shuffle import block

    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(0, 40, size=int(rng.integers(1, 30)))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    every = np.arange(total, dtype=np.int64)
    some = np.sort(rng.choice(every, size=total // 2, replace=False)) if total else every
    repeated = np.sort(np.concatenate([every, some]))
    for ids in (every, some, repeated):
        for size in (1, 7, 64):
            expected = _reference_block_order(starts, ids, seed, size)
            got = block.order(starts, ids.copy(), np.random.default_rng(seed), size)
            assert np.array_equal(got, expected)
    chunked = block.CHUNK_SAMPLES
    try:  # keys drawn chunk by chunk are the same numbers as one draw
        block.CHUNK_SAMPLES = 16
        got = block.order(starts, every, np.random.default_rng(seed), 5)
    finally:
        block.CHUNK_SAMPLES = chunked
    assert np.array_equal(got, _reference_block_order(starts, every, seed, 5))
