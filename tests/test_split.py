"""Splits: the pure module, the loader's section filter, leak-free training and eval per fold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from data_helpers import DEFAULT_SECTIONS, SectionSpec, make_corpus, tokens
from typer.testing import CliRunner

import histmol.model.train as train_module
from histmol.cli import app
from histmol.data import PairDataset
from histmol.errors import ConfigError
from histmol.model.evaluate import evaluate_split
from histmol.model.train import CHECKPOINT, TrainConfig, fold_dir, train, train_folds
from histmol.split import make_split, read_split, write_split

PATIENTS = ("p1", "p2", "p2", "p3")
SECTIONS = tuple(
    SectionSpec(s.section_id, s.platform, s.tissue, s.n_pairs, s.units_per_pair, s.genes,
                extra={"patient_id": patient})
    for s, patient in zip((*DEFAULT_SECTIONS, SectionSpec(
        "s-extra", "visium", "lung", 6, 1, ("g0", "g1", "g3", "g7"))), PATIENTS, strict=True))
PAIRS = {s.section_id: s.n_pairs for s in SECTIONS}


def rows(**patient: str) -> list[dict[str, Any]]:
    return [{"section_id": s.section_id, "patient_id": patient.get(s.section_id, p),
             "tissue": s.tissue, "platform": s.platform, "n_pairs": s.n_pairs}
            for s, p in zip(SECTIONS, PATIENTS, strict=True)]


def config(**kw: object) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, genes="hvg:3", width=8, embed_dim=8, warmup_steps=1,
                log_every=100, checkpoint_every=100, seed=1)
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("split") / "corpus", SECTIONS)


@pytest.fixture(scope="module")
def folds_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every fold of the leave-one-patient-out split trained for one epoch."""
    run = tmp_path_factory.mktemp("folds") / "run"
    train_folds(corpus, run, config(epochs=1), make_split(rows(), "patient"))
    return run


@pytest.fixture()
def consumed(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Section ids of every batch the trainer takes from its loader, one list per train call."""
    calls: list[list[str]] = []

    class Recording(train_module.StatefulDataLoader):  # type: ignore[misc, name-defined]
        def __iter__(self):  # noqa: ANN204 - the loader's own iterator
            seen: list[str] = []
            calls.append(seen)
            for batch in super().__iter__():
                seen.extend(batch["section_id"])
                yield batch

    monkeypatch.setattr(train_module, "StatefulDataLoader", Recording)
    return calls


def test_patient_split_groups_sections_and_is_leave_one_out_by_default() -> None:
    split = make_split(rows(), "patient")
    assert split.folds == (("p1",), ("p2",), ("p3",))
    assert split.test_sections(1) == ["s-hd", "s-xenium"]
    assert split.train_sections(1) == ["s-extra", "s-visium"]
    for i in range(3):
        assert not set(split.test_sections(i)) & set(split.train_sections(i))
        assert sorted(split.test_sections(i) + split.train_sections(i)) == sorted(PAIRS)


def test_k_folds_balance_pairs_and_the_seed_only_breaks_ties() -> None:
    split = make_split(rows(), "section", folds=2)
    # 10 | 7 + 5 vs 6: largest first to the lightest fold
    assert split.folds == (("s-visium", "s-xenium"), ("s-extra", "s-hd"))
    assert make_split(rows(), "section", folds=2, seed=5).folds == split.folds
    tie = [{"section_id": f"s{i}", "patient_id": f"p{i}", "n_pairs": 3} for i in range(6)]
    orders = {make_split(tie, "patient", folds=3, seed=seed).folds for seed in range(8)}
    assert len(orders) > 1  # equal groups: the seed decides
    assert make_split(tie, "patient", folds=3, seed=2) == make_split(tie, "patient", folds=3,
                                                                      seed=2)


def test_split_by_tissue_platform_and_an_explicit_list() -> None:
    assert make_split(rows(), "tissue").folds == (("colon",), ("lung",))
    assert make_split(rows(), "platform").test_sections(0) == ["s-extra", "s-visium"]
    listed = make_split(rows(), "list", held_out=[["s-hd"], ["s-extra", "s-xenium"]])
    assert [listed.test_sections(i) for i in range(2)] == [["s-hd"], ["s-extra", "s-xenium"]]
    assert listed.train_sections(0) == ["s-extra", "s-visium", "s-xenium"]
    with pytest.raises(ConfigError, match="held out twice"):
        make_split(rows(), "list", held_out=[["s-hd"], ["s-hd"]])
    with pytest.raises(ConfigError, match="not in the corpus"):
        make_split(rows(), "list", held_out=[["nope"]])


def test_split_refuses_what_cannot_be_split() -> None:
    with pytest.raises(ConfigError, match="has no patient_id"):
        make_split(rows(**{"s-hd": ""}), "patient")
    with pytest.raises(ConfigError, match="folds must be 2..3"):
        make_split(rows(), "patient", folds=4)
    with pytest.raises(ConfigError, match="must be one of"):
        make_split(rows(), "donor")


def test_split_file_round_trips_and_refuses_edits(tmp_path: Path) -> None:
    split = make_split(rows(), "patient", folds=2, seed=3)
    path = write_split(split, tmp_path / "split.json")
    assert read_split(path) == split
    data = json.loads(path.read_text())
    assert data["folds"][0]["test_sections"] == split.test_sections(0)
    data["sections"]["s-hd"] = "p1"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="checksum mismatch"):
        read_split(path)
    with pytest.raises(ConfigError, match="no split file"):
        read_split(tmp_path / "none.json")


def test_loader_reads_only_the_given_sections(corpus: Path) -> None:
    ds = PairDataset(corpus, sections=["s-hd", "s-extra"], batch_size=1)
    got = [sample["section_id"] for sample in ds]
    assert sorted(got) == ["s-extra"] * 6 + ["s-hd"] * 7 and ds.epoch_length == 13
    with pytest.raises(ConfigError, match=r"\['nope'\] are not committed"):
        PairDataset(corpus, sections=["s-hd", "nope"])


def test_hvg_is_ranked_on_the_given_sections_only(corpus: Path) -> None:
    # g5 is measured by s-hd only: it can be chosen from s-hd, never from sections without it
    only_hd = tokens(list(PairDataset(corpus, genes="hvg:4", sections=["s-hd"]).gene_set.gene_id))
    assert set(only_hd) == {"g2", "g3", "g5", "g6"}
    others = tokens(list(PairDataset(corpus, genes="hvg:5",
                                     sections=["s-visium"]).gene_set.gene_id))
    assert "g5" not in others and set(others) == {"g0", "g1", "g2", "g3", "g4"}


def test_library_training_never_sees_a_held_out_pair(corpus: Path, tmp_path: Path,
                                                     consumed: list[list[str]]) -> None:
    split = make_split(rows(), "patient")
    summaries = train_folds(corpus, tmp_path / "run", config(epochs=1), split)
    assert [s["fold"] for s in summaries] == [0, 1, 2] and len(consumed) == 3
    for i in range(3):
        seen = set(consumed[i])
        assert seen == set(split.train_sections(i))  # every training section, nothing else
        assert not seen & set(split.test_sections(i))
        train_pairs = sum(PAIRS[s] for s in split.train_sections(i))
        assert len(consumed[i]) == train_pairs // 4 * 4  # drop_last batches of 4
        payload = torch.load(fold_dir(tmp_path / "run", i) / CHECKPOINT, weights_only=False)
        assert payload["split"] == split.record(i)


def test_cli_split_then_train_every_fold_never_sees_a_held_out_pair(
        corpus: Path, tmp_path: Path, consumed: list[list[str]]) -> None:
    runner = CliRunner()
    split_file = tmp_path / "split.json"
    result = runner.invoke(app, ["split", str(corpus), "--by", "patient", "--folds", "2",
                                 "--out", str(split_file)])
    assert result.exit_code == 0, result.output
    split = read_split(split_file)
    common = ["train", str(corpus), "--out", str(tmp_path / "run"), "--split", str(split_file),
              "--epochs", "1", "--batch-size", "4", "--genes", "hvg:3"]
    result = runner.invoke(app, [*common, "--fold", "all"])
    assert result.exit_code == 0, result.output
    assert len(consumed) == 2
    for i in range(2):
        assert set(consumed[i]) == set(split.train_sections(i))
        assert (fold_dir(tmp_path / "run", i) / CHECKPOINT).is_file()
    result = runner.invoke(app, [*common[:3], str(tmp_path / "one"), *common[4:], "--fold", "1"])
    assert result.exit_code == 0, result.output
    assert set(consumed[2]) == set(split.train_sections(1))
    assert not (tmp_path / "one" / "fold-0").exists()
    result = runner.invoke(app, [*common, "--fold", "7"])
    assert result.exit_code == 1 and "fold must be 0..1" in result.output


def test_resume_keeps_the_fold_and_refuses_another(corpus: Path, tmp_path: Path) -> None:
    split = make_split(rows(), "patient")
    out = tmp_path / "f"
    train(corpus, out, config(max_steps=1), split=split, fold=0)
    with pytest.raises(ConfigError, match="resume it with the same split and fold"):
        train(corpus, out, config(), resume=True, split=split, fold=1)
    assert train(corpus, out, config(), resume=True, split=split, fold=0)["finished"]


def test_eval_scores_each_fold_with_its_own_encoder(corpus: Path, folds_run: Path,
                                                    tmp_path: Path) -> None:
    split = make_split(rows(), "patient")
    done: list[tuple[int, int]] = []
    tables = evaluate_split(folds_run, corpus, split, genes="hvg:3", batch_size=8, out=tmp_path,
                            progress=lambda d, t: done.append((d, t)))
    assert done[-1] == (28, 28) and len(done) == 4  # 28 pairs in batches of 8
    per_fold, per_gene = tables["per_fold"], tables["per_gene"]
    assert list(per_fold["model"].unique()) == ["trained", "random-init", "mean-expression"]
    assert sorted(per_fold["fold"].unique()) == [0, 1, 2] and len(per_gene) == 3 * 3 * 3
    for i in range(3):
        fold = per_fold[per_fold["fold"] == i]
        test = sum(PAIRS[s] for s in split.test_sections(i))
        assert set(fold["n_test_pairs"]) == {test} and set(fold["n_train_pairs"]) == {28 - test}
        genes = per_gene[per_gene["fold"] == i]
        expected = PairDataset(corpus, genes="hvg:3",
                               sections=split.train_sections(i)).gene_set.gene_id
        for model in ("trained", "random-init", "mean-expression"):  # same genes for all three
            assert tuple(genes[genes["model"] == model]["gene_id"]) == expected
    mean = per_gene[per_gene["model"] == "mean-expression"]["pearson"].dropna()
    assert (mean == 0.0).all()
    summary = tables["summary"].set_index("model")
    trained = per_fold[per_fold["model"] == "trained"]["pearson_mean"]
    assert summary.loc["trained", "pearson_mean"] == pytest.approx(trained.mean())
    assert summary.loc["trained", "pearson_sd"] == pytest.approx(trained.std(ddof=1))
    for name in ("per_gene", "per_fold", "summary"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{name}.parquet"),
                                      tables[name], check_dtype=False)
        assert len(pd.read_csv(tmp_path / f"{name}.csv")) == len(tables[name])


def test_eval_refuses_a_fold_trained_on_another_split(corpus: Path, folds_run: Path,
                                                      tmp_path: Path) -> None:
    other = make_split(rows(), "section", folds=3)  # the run's folds hold out patients
    with pytest.raises(ConfigError, match="fold-0: trained on another split or fold"):
        evaluate_split(folds_run, corpus, other, genes="hvg:3", out=tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint for fold 0"):
        evaluate_split(tmp_path / "none", corpus, other, genes="hvg:3")


def test_cli_eval_prints_folds_and_the_spread(corpus: Path, folds_run: Path,
                                              tmp_path: Path) -> None:
    split_file = write_split(make_split(rows(), "patient"), tmp_path / "split.json")
    result = CliRunner().invoke(app, ["eval", str(folds_run), str(corpus), "--split",
                                      str(split_file), "--genes", "hvg:3", "--batch-size", "8",
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "+-" in result.output and "over 3 folds" in result.output
    per_fold = pd.read_csv(tmp_path / "eval" / "per_fold.csv")
    assert len(per_fold) == 3 * 3 and np.isfinite(per_fold["mse"]).all()
