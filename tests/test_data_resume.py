"""PairDataset resumption: exact mid-epoch resume, native and elastic (other worlds/workers)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
from data_helpers import DEFAULT_SECTIONS, make_corpus
from torchdata.stateful_dataloader import StatefulDataLoader

from histmol.data import PairDataset, pair_collate

TOTAL = sum(s.n_pairs for s in DEFAULT_SECTIONS)  # 22
B = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("resume") / "corpus")


def dataset(corpus: Path, rank: int = 0, world: int = 1, **kw) -> PairDataset:
    return PairDataset(corpus, seed=7, batch_size=B, rank=rank, world_size=world, **kw)


def loader(ds: PairDataset, workers: int) -> StatefulDataLoader:
    return StatefulDataLoader(ds, batch_size=B, num_workers=workers, collate_fn=pair_collate)


def indices(batches) -> list[int]:
    return [i for batch in batches for i in batch["index"].tolist()]


@pytest.mark.parametrize("workers", [0, 2])
def test_native_resume_continues_the_exact_sequence(corpus: Path, workers: int) -> None:
    full = indices(loader(dataset(corpus), workers))
    first = loader(dataset(corpus), workers)
    taken = indices(itertools.islice(first, 3))
    state = first.state_dict()
    resumed = loader(dataset(corpus), workers)
    resumed.load_state_dict(state)
    assert taken + indices(resumed) == full


@pytest.mark.parametrize(("world", "workers", "new_world", "new_workers"),
                         [(2, 2, 3, 1), (1, 0, 2, 3), (3, 1, 1, 0), (2, 0, 2, 2)])
def test_elastic_resume_yields_exactly_the_remaining_samples(
    corpus: Path, world: int, workers: int, new_world: int, new_workers: int
) -> None:
    steps = 2
    taken, states = [], []
    for rank in range(world):  # ranks step together: each takes `steps` batches
        run = loader(dataset(corpus, rank, world), workers)
        taken += indices(itertools.islice(run, steps))
        states.append(run.state_dict())
    assert len(taken) == steps * B * world
    rest = []
    for rank in range(new_world):
        ds = dataset(corpus, rank, new_world)
        ds.load_state_dict(states[0])  # any rank's state: they agree
        rest += indices(loader(ds, new_workers))
    assert sorted(taken + rest) == list(range(TOTAL))
    order = [i for i in dataset(corpus)._order(0)]
    assert sorted(taken) == sorted(order[:len(taken)])  # the consumed prefix of the order


def test_resume_from_a_finished_epoch_starts_the_next(corpus: Path) -> None:
    run = loader(dataset(corpus), 2)
    epoch0 = indices(run)
    ds = dataset(corpus)
    ds.load_state_dict(run.state_dict())
    assert ds.epoch == 1
    epoch1 = indices(loader(ds, 0))
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0
    fresh = dataset(corpus)
    fresh.set_epoch(1)
    assert indices(loader(fresh, 1)) == epoch1


def test_dataset_state_without_a_loader(corpus: Path) -> None:
    ds = dataset(corpus)
    it = iter(ds)
    head = [next(it)["index"] for _ in range(5)]  # mid-batch: one rank is exact to the sample
    again = dataset(corpus)
    again.load_state_dict(ds.state_dict())
    assert head + [s["index"] for s in again] == [s["index"] for s in dataset(corpus)]


def test_states_from_other_data_or_layouts_are_refused(corpus: Path, monkeypatch) -> None:
    state = dataset(corpus).state_dict()
    with pytest.raises(ValueError, match="other corpora contents or order options"):
        dataset(corpus, block_size=5).load_state_dict(state)
    with pytest.raises(ValueError, match="not a PairDataset or StatefulDataLoader state"):
        dataset(corpus).load_state_dict({"epoch": 1})
    run = loader(dataset(corpus), 2)
    batches = iter(run)
    next(batches)
    saved = run.state_dict()
    list(batches)  # finish the epoch so the workers exit
    one_worker = saved["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"]
    with pytest.raises(ValueError, match="whole loader state"):
        dataset(corpus).load_state_dict(one_worker)
    # Inside a worker (torchdata restoring its own state) the layout must match.
    monkeypatch.setattr("histmol.data.dataset.get_worker_info",
                        lambda: SimpleNamespace(id=0, num_workers=2))
    with pytest.raises(ValueError, match=r"worker state differs in \['world_size'\]"):
        dataset(corpus, 0, 2).load_state_dict(one_worker)
    resumed = dataset(corpus)
    resumed.load_state_dict(one_worker)
    assert resumed.state_dict()["position"] == one_worker["position"] > 0
