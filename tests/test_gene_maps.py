"""QC shows biology: genes.png maps the most variable (or the asked-for) genes over the slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from qc_corpus import QcCorpus, shared_qc_corpus
from typer.testing import CliRunner

from histmol.cli import app
from histmol.errors import ConfigError
from histmol.qc.gene_maps import pick_genes
from histmol.qc.section_data import load_section
from histmol.shards.corpus import Corpus


@pytest.fixture(scope="module")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QcCorpus:
    return shared_qc_corpus(tmp_path_factory)


def dense_log_cp10k(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(counts * 1e4, totals, out=np.zeros(counts.shape), where=totals > 0))


def test_default_genes_are_the_most_variable_detected_ones(qc: QcCorpus) -> None:
    section = load_section(qc.root, "crc-01", counts=True)
    genes = Corpus.open(qc.root).genes()
    maps = pick_genes(section, genes, n=3)
    counts = section.counts.toarray().astype(np.float64)
    expression = dense_log_cp10k(counts)
    detected = (counts > 0).sum(axis=0)
    variance = np.where(detected >= 0.05 * len(counts), expression.var(axis=0), -np.inf)
    assert [m.index for m in maps] == list(np.argsort(-variance, kind="stable")[:3])
    symbols = genes.set_index("index")["symbol"]
    assert [m.label for m in maps] == [symbols[i] for i in np.argsort(-variance, kind="stable")[:3]]
    for gene_map in maps:
        np.testing.assert_allclose(gene_map.values, expression[:, gene_map.index])


def test_named_genes_by_symbol_or_id_any_case(qc: QcCorpus) -> None:
    section = load_section(qc.root, "crc-01", counts=True)
    genes = Corpus.open(qc.root).genes()
    first = genes.set_index("index").loc[int(section.counts.indices[0])]
    maps = pick_genes(section, genes, [str(first["symbol"]).lower(), str(first["gene_id"])])
    assert [m.label for m in maps] == [first["symbol"]] * 2
    with pytest.raises(ConfigError, match=r"gene\(s\) NOPE1 not measured in this section \(e.g. "):
        pick_genes(section, genes, ["NOPE1"])


def test_qc_command_writes_the_gene_maps(qc: QcCorpus, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["qc", str(qc.root), "--section", "crc-01", "--out", str(tmp_path), "--n-genes", "2"]
    )
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "crc-01" / "genes.png") as image:
        width, height = image.size
    assert width > 2.5 * height  # three panels side by side: total counts and two genes
    result = runner.invoke(
        app, ["qc", str(qc.root), "--section", "crc-01", "--out", str(tmp_path), "--genes", "x9"]
    )
    assert result.exit_code == 1 and "gene(s) x9 not measured" in result.output
