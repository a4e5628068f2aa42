"""Training, exact resume, embedding export, the eval protocol and the CLI, on small corpora."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fixture_path
from data_helpers import DEFAULT_SECTIONS, SectionSpec, make_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.errors import ConfigError
from histmol.model.embed import embed_corpus
from histmol.model.evaluate import evaluate_split
from histmol.model.train import CHECKPOINT, TrainConfig, load_model, train, train_folds
from histmol.split import make_split

TOTAL = sum(s.n_pairs for s in DEFAULT_SECTIONS)  # 22 pairs of 16 px
SECTIONS = tuple(SectionSpec(s.section_id, s.platform, s.tissue, s.n_pairs, s.units_per_pair,
                             s.genes, extra={"patient_id": patient})
                 for s, patient in zip(DEFAULT_SECTIONS, ("p1", "p2", "p2"), strict=True))


def config(**kw: object) -> TrainConfig:
    base = dict(epochs=2, batch_size=4, genes="all", width=8, embed_dim=8, warmup_steps=2,
                log_every=1, checkpoint_every=100, seed=3)
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("train") / "corpus", SECTIONS)


@pytest.fixture(scope="module")
def run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r1"
    train(corpus, out, config())
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / CHECKPOINT, weights_only=False)["model"]


def test_training_runs_every_step_and_logs_it(run: Path) -> None:
    payload = torch.load(run / CHECKPOINT, weights_only=False)
    assert payload["step"] == 2 * (TOTAL // 4)  # drop_last: 5 full batches an epoch
    assert set(payload) >= {"model", "optimizer", "scheduler", "rng", "loader", "genes"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["epoch"] for r in rows] == [0] * 5 + [1] * 5
    assert rows[-1]["lr"] < rows[2]["lr"]  # cosine decay after warm-up
    assert len(pd.read_csv(run / "metrics.csv")) == 10


@pytest.mark.parametrize(("pause", "accum", "workers"),
                         [(3, 1, 0), (7, 1, 0), (5, 1, 0), (2, 2, 0), (3, 1, 2)])
def test_resume_continues_exactly(corpus: Path, run: Path, tmp_path: Path, pause: int,
                                  accum: int, workers: int) -> None:
    reference = run
    if accum != 1 or workers:
        reference = tmp_path / "straight"
        train(corpus, reference, config(grad_accum=accum, num_workers=workers))
    out = tmp_path / "paused"
    first = train(corpus, out, config(grad_accum=accum, num_workers=workers, max_steps=pause))
    assert first["step"] == pause and not first["finished"]
    second = train(corpus, out, config(), resume=True)
    assert second["finished"]
    expected, got = weights(reference), weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1))


def test_existing_run_needs_resume_and_resume_needs_a_run(corpus: Path, run: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        train(corpus, run, config())
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(corpus, tmp_path / "none", config(), resume=True)


def test_embeddings_go_to_parquet_and_anndata(corpus: Path, run: Path, tmp_path: Path) -> None:
    table = pd.read_parquet(embed_corpus(run, corpus, tmp_path / "e.parquet"))
    assert len(table) == TOTAL
    keys = zip(table["section_id"], table["part"], table["pair_index"], strict=True)
    assert sorted(keys) == sorted(  # 4 pairs a part
        (s.section_id, p // 4, p % 4) for s in SECTIONS for p in range(s.n_pairs))
    image = np.stack(table["image_embedding"].to_numpy())
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, rtol=1e-5)
    adata = ad.read_h5ad(embed_corpus(run, corpus, tmp_path / "e.h5ad"))
    model, payload = load_model(run)
    assert adata.shape == (TOTAL, len(payload["genes"]))
    assert list(adata.var_names) == payload["genes"]
    assert adata.obsm["X_histmol_image"].shape == (TOTAL, 8)
    np.testing.assert_allclose(adata.obsm["X_histmol_image"], image, rtol=1e-5, atol=1e-6)
    assert adata.obs["section_id"].value_counts().to_dict() == {
        s.section_id: s.n_pairs for s in SECTIONS}


def test_split_by_patient_names_sections_without_patient(tmp_path: Path) -> None:
    bare = make_corpus(tmp_path / "bare")
    result = CliRunner().invoke(app, ["split", str(bare), "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 1 and "has no patient_id" in result.output
    assert not (tmp_path / "s.json").exists()


def test_cli_train_resume_embed_eval(corpus: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    common = [str(corpus), "--out", str(out), "--epochs", "1", "--batch-size", "4",
              "--genes", "all"]
    result = runner.invoke(app, ["train", *common, "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", *common, "--resume"])
    assert result.exit_code == 0, result.output
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == 5
    embedded = tmp_path / "e.parquet"
    result = runner.invoke(app, ["embed", str(out), str(corpus), "--out", str(embedded)])
    assert result.exit_code == 0 and len(pd.read_parquet(embedded)) == TOTAL


@pytest.mark.slow
def test_mob1_fixture_trains_and_evaluates_end_to_end(tmp_path: Path) -> None:
    """Smoke only: MOB1 is one section, built twice as two 'patients' to exercise the folds."""
    from histmol.build import SectionRequest, build_section
    from histmol.config import BuildConfig

    folder = fixture_path("legacy_st_stutility_MOB1/counts")
    out = tmp_path / "corpus"
    for i in (1, 2):
        request = SectionRequest("st", folder, folder / "MOB1.jpg", f"mob1-copy{i}",
                                 metadata={"patient_id": f"copy{i}"})
        build_section(request, out, BuildConfig(mpp=4.6, target_mpp=5.0, patch_px=64))
    split = make_split([{"section_id": f"mob1-copy{i}", "patient_id": f"copy{i}", "n_pairs": 379}
                        for i in (1, 2)], "patient")
    summaries = train_folds(out, tmp_path / "run", config(epochs=1, batch_size=32,
                                                          genes="hvg:50", log_every=5), split)
    assert all(s["finished"] and s["step"] == 379 // 32 for s in summaries)
    tables = evaluate_split(tmp_path / "run", out, split, genes="hvg:50")
    per_fold = tables["per_fold"]
    assert set(per_fold["n_genes"]) == {50} and np.isfinite(per_fold["pearson_mean"]).all()
    assert set(per_fold["n_test_pairs"]) == {379}


def test_torchrun_ddp_trains_and_resumes_on_one_process(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "-m", "histmol.model.train", str(corpus), "--out", str(out), "--epochs", "2",
               "--batch-size", "4", "--genes", "all", "--width", "8", "--embed-dim", "8",
               "--max-steps", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = torch.load(out / CHECKPOINT, weights_only=False)
    assert payload["step"] == 3 and payload["loader"]["dataset_state"]["world_size"] == 2
    # epoch 0: 22 // 8 = 2 steps; step 3 took 2 x 4 pairs of epoch 1; 14 remain for 1 process
    summary = train(corpus, out, config(), resume=True)
    assert summary["finished"] and summary["step"] == 3 + 14 // 4 and summary["pairs"] == 12


@pytest.mark.slow
def test_training_beats_both_baselines_where_morphology_drives_expression(tmp_path: Path) -> None:
    """Acceptance: synthetic slides whose regions drive marker genes, held out by patient."""
    from histmol.build import SectionRequest, build_section
    from histmol.config import BuildConfig
    from histmol.synth import make_slide, write_visium_bundle

    corpus = tmp_path / "corpus"
    for i in range(6):  # three patients, two sections each
        slide = make_slide(tmp_path / f"slide{i}.tif", width_um=1400.0, height_um=1200.0,
                           mpp=0.5, seed=10 + i)
        truth = write_visium_bundle(tmp_path / f"visium{i}", slide, seed=10 + i, n_genes=60)
        build_section(SectionRequest("visium", truth.bundle, slide.path, f"syn-{i}",
                                     truth.transform_path, metadata={"patient_id": f"p{i // 2}"}),
                      corpus, BuildConfig(patch_px=64))
    split = make_split([{"section_id": f"syn-{i}", "patient_id": f"p{i // 2}", "n_pairs": 1}
                        for i in range(6)], "patient")
    train_folds(corpus, tmp_path / "run", TrainConfig(
        epochs=20, batch_size=64, lr=2e-3, image_encoder="resnet18", width=16, genes="hvg:50",
        log_every=100), split)
    tables = evaluate_split(tmp_path / "run", corpus, split, genes="hvg:50")
    r = tables["summary"].rename(columns={"mse_mean": "mse"}).set_index("model")
    assert r.loc["trained", "pearson_mean"] > r.loc["random-init", "pearson_mean"] + 0.05
    assert r.loc["trained", "pearson_mean"] > 0.3  # the mean baseline scores 0
    assert r.loc["trained", "mse"] < 0.9 * min(r.loc["random-init", "mse"],
                                               r.loc["mean-expression", "mse"])
