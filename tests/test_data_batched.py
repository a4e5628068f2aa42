"""Batched PairDataset: the same batches as per-sample + pair_collate; shared buffers are safe."""

from __future__ import annotations

import gc
import itertools
import os
import shutil
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import DEFAULT_SECTIONS, ENSEMBL, make_corpus, patch_value
from torchdata.stateful_dataloader import StatefulDataLoader

from histmol.data import PairDataset, pair_collate
from histmol.data.shm import BufferPool, SharedBuffer
from histmol.shards.jpeg import ROW_ALIGNMENT, ROW_OFFSET, misaligned_empty

GENE_LIST = [ENSEMBL["g6"], ENSEMBL["g2"], ENSEMBL["g0"]]
TOTAL = sum(s.n_pairs for s in DEFAULT_SECTIONS)  # 22
SECTION = {s.section_id: i for i, s in enumerate(DEFAULT_SECTIONS)}
PAIRS_PER_SHARD = 4
TENSORS = ("patch", "expression", "positions", "unit_batch", "panel_mask", "n_units", "index",
           "part", "pair_index", "corpus")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("batched") / "corpus",
                       pairs_per_shard=PAIRS_PER_SHARD)


def batches(corpus: Path, batched: bool, workers: int = 0, rank: int = 0, world: int = 1,
            b: int = 3, **kw) -> list[dict]:
    ds = PairDataset(corpus, seed=5, batch_size=b, batched=batched, rank=rank, world_size=world,
                     **kw)
    return list(StatefulDataLoader(ds, batch_size=None if batched else b, num_workers=workers,
                                   collate_fn=pair_collate))


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert list(a) == list(b)
        for name in a:
            if name in TENSORS:
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


def expected_patch(batch: dict) -> np.ndarray:
    """The flat grey levels the batch's pairs were written with, as (B, 1, 1, 1)."""
    values = [patch_value(SECTION[s], part * PAIRS_PER_SHARD + pair) for s, part, pair in
              zip(batch["section_id"], batch["part"].tolist(), batch["pair_index"].tolist(),
                  strict=True)]
    return np.array(values).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 1), (3, 3)])
def test_batched_mode_yields_exactly_the_collated_batches(
    corpus: Path, world: int, workers: int
) -> None:
    for rank in range(world):
        want = batches(corpus, False, workers, rank, world)
        got = batches(corpus, True, workers, rank, world)
        assert_same(got, want)
        assert all(g["patch"].shape[1:] == (16, 16, 3) for g in got)
    everything = [i for r in range(world) for b in batches(corpus, True, workers, r, world)
                  for i in b["index"].tolist()]
    assert sorted(everything) == list(range(TOTAL))


def test_float_patches_transforms_and_aggregation_match_per_sample_batches(corpus: Path) -> None:
    for kw in ({"patch_format": "float_chw"}, {"patch_transform": lambda p: p[::2, ::2]},
               {"aggregate_units": True}, {"genes": GENE_LIST},
               {"genes": GENE_LIST, "aggregate_units": True}, {"max_open_parts": 1}):
        assert_same(batches(corpus, True, 1, **kw), batches(corpus, False, 1, **kw))


def test_batched_resume_matches_per_sample_resume_natively_and_elastically(corpus: Path) -> None:
    full = [i for b in batches(corpus, True, 2) for i in b["index"].tolist()]
    ds = PairDataset(corpus, seed=5, batch_size=3, batched=True)
    first = StatefulDataLoader(ds, batch_size=None, num_workers=2)
    taken = [i for b in itertools.islice(first, 3) for i in b["index"].tolist()]
    state = first.state_dict()
    resumed = StatefulDataLoader(PairDataset(corpus, seed=5, batch_size=3, batched=True),
                                 batch_size=None, num_workers=2)
    resumed.load_state_dict(state)
    assert taken + [i for b in resumed for i in b["index"].tolist()] == full
    # The same state continues a per-sample loader on another worker count.
    elastic = PairDataset(corpus, seed=5, batch_size=3)
    elastic.load_state_dict(state)
    rest = StatefulDataLoader(elastic, batch_size=3, num_workers=1, collate_fn=pair_collate)
    assert sorted(taken + [i for b in rest for i in b["index"].tolist()]) == list(range(TOTAL))


def test_skipped_samples_group_as_the_dataloader_groups_them(corpus: Path, tmp_path: Path) -> None:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    (copy / "shards" / "s-hd" / "part-00001.zarr" / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.warns(UserWarning, match="skipping corrupt part"):
        want = batches(copy, False, on_corrupt="skip")
    with pytest.warns(UserWarning, match="skipping corrupt part"):
        got = batches(copy, True, on_corrupt="skip")
    assert_same(got, want)
    assert sum(len(b["index"]) for b in got) == TOTAL - 3


def test_held_batches_are_never_overwritten(corpus: Path) -> None:
    # batch 2 over 11 batches with at most 8 kept buffers: the worker must not reuse a buffer
    # while any batch over it is held here (all of them are, until the end).
    ds = PairDataset(corpus, seed=1, batch_size=2, batched=True)
    held = list(StatefulDataLoader(ds, batch_size=None, num_workers=1, prefetch_factor=4))
    assert sum(len(b["index"]) for b in held) == TOTAL
    for batch in held:
        assert np.abs(batch["patch"].numpy().astype(int) - expected_patch(batch)).max() <= 1
    # Dropped batches free their buffers: a long epoch in small steps keeps working.
    ds = PairDataset(corpus, seed=2, batch_size=1, batched=True)
    for batch in StatefulDataLoader(ds, batch_size=None, num_workers=1):
        assert np.abs(batch["patch"].numpy().astype(int) - expected_patch(batch)).max() <= 1


def test_a_buffer_is_reused_only_after_every_tensor_over_it_is_gone() -> None:
    pool = BufferPool(keep=2)
    first = pool.take(64)
    patches = first.view(0, np.dtype(np.uint8), (4, 2, 2, 3))
    ids = first.view(48, np.dtype(np.int64), (2,))
    patches[:] = 7
    ids[:] = [5, 6]
    # as a worker's queue does; each array has a flag of its own
    leases = first.lease([(0, 0, np.uint8, (3, 2, 2, 3)), (1, 48, np.int64, (2,))])
    sent, sent_ids = ForkingPickler.loads(ForkingPickler.dumps(leases))  # one fd passed, once
    assert sent.shape == (3, 2, 2, 3) and sent.dtype == torch.uint8 and int(sent.sum()) == 7 * 36
    assert sent_ids.dtype == torch.int64 and sent_ids.tolist() == [5, 6]
    assert first.held and pool.take(64) is not first
    alias = sent[1:].numpy()
    del sent
    gc.collect()
    assert first.held  # a numpy alias of the tensor still holds the buffer
    patches[:] = 9  # the sender's writes reach the receiver's mapping: it is shared
    assert int(alias.sum()) == 9 * 24
    del alias
    gc.collect()
    assert first.held  # the ids tensor is still alive
    del sent_ids
    gc.collect()
    assert not first.held and pool.take(64) is first
    assert pool.take(65) is not first  # too small for that
    unsent = first.lease([(3, 0, np.uint8, (1,))])
    del unsent  # a lease never sent frees its flag
    assert not first.held


def memfds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:histmol-batch")
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


@pytest.mark.parametrize("workers", [0, 1])
def test_batch_rows_start_off_a_32_byte_boundary(corpus: Path, workers: int) -> None:
    # libjpeg-turbo writes 32-byte-aligned rows with non-temporal stores (slower; see shm.py):
    # every patch row of a batch, in a worker's shared buffer or in the main process, and every
    # single decoded patch, is off it.
    for shape in [(3, 5), (256, 224, 224, 3), (7, 16, 16, 3)]:
        assert misaligned_empty(shape).ctypes.data % ROW_ALIGNMENT == ROW_OFFSET
    buffer = SharedBuffer(2 * 4 * 4 * 3)
    assert buffer.view(0, np.dtype(np.uint8), (2, 4, 4, 3)).ctypes.data % ROW_ALIGNMENT == \
        ROW_OFFSET
    for batch in batches(corpus, True, workers):
        assert batch["patch"].data_ptr() % ROW_ALIGNMENT == ROW_OFFSET
    for sample in PairDataset(corpus, batch_size=3):  # per-sample patches too
        assert sample["patch"].ctypes.data % ROW_ALIGNMENT == ROW_OFFSET


def test_buffers_leave_nothing_in_dev_shm_and_close_their_files() -> None:
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    open_before = memfds()
    buffer = SharedBuffer(2 * 4 * 4 * 3)
    assert memfds() > open_before  # an anonymous memfd, nothing named in /dev/shm
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after == before
    del buffer
    gc.collect()
    assert memfds() == open_before


def test_pair_collate_passes_a_batch_through() -> None:
    batch = {"patch": torch.zeros(2, 4, 4, 3, dtype=torch.uint8), "index": torch.tensor([3, 4])}
    out = pair_collate(batch)
    assert out == batch and out is not batch
