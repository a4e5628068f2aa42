"""One gene space: resolution rules, homolog columns, bad panels, and migration of old corpora."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from gene_space_helpers import write_counts

from histmol.data import PairDataset
from histmol.errors import CorpusError
from histmol.gene_reference import TAIL_BASE, reference, resolve_features, tail_index
from histmol.genes import gene_qc, infer_species
from histmol.shards.corpus import Corpus
from histmol.shards.migrate import migrate_corpus
from histmol.validate import validate_corpus
from platform_adapters._common import build_gene_panel

EPCAM, GFAP, APOL1 = "ENSG00000119888", "ENSG00000131095", "ENSG00000100342"
MOUSE_EPCAM, MOUSE_GFAP, PBSN = "ENSMUSG00000045394", "ENSMUSG00000020932", "ENSMUSG00000000003"


def row(ensembl_id: str) -> int:
    """The stable index of a reference gene: its row in the shipped reference."""
    return int(reference().ensembl.get_loc(ensembl_id))


def test_features_resolve_by_id_symbol_case_alias_and_r_names() -> None:
    human = resolve_features(
        ["ENSG00000119888.7", "EPCAM", "epcam", "TACSTD1", "HLA.DRA", "NotAGene1"],
        ["x", "EPCAM", "epcam", "TACSTD1", "HLA.DRA", "NotAGene1"])
    assert human["gene_id"].tolist() == [EPCAM] * 4 + [
        "ENSG00000204287", "unresolved:human:NotAGene1"]
    assert human["symbol"].tolist() == ["EPCAM"] * 4 + ["HLA-DRA", "NotAGene1"]
    assert human["resolved"].tolist() == [True] * 5 + [False]
    assert human["index"].tolist()[:5] == [row(EPCAM)] * 4 + [row("ENSG00000204287")]
    assert human["index"].iat[5] == tail_index("unresolved:human:NotAGene1") >= TAIL_BASE
    mouse = resolve_features(["Gfap", "X4933401J01Rik", "gfap"], ["Gfap", "X4933401J01Rik", "gfap"])
    assert mouse["gene_id"].tolist() == [MOUSE_GFAP, "ENSMUSG00000102693", MOUSE_GFAP]
    assert set(mouse["species"]) == {"mouse"}
    again = resolve_features(human["gene_id"], human["symbol"])  # resolving twice: no change
    assert again["gene_id"].tolist() == human["gene_id"].tolist()
    assert again["index"].tolist() == human["index"].tolist()


def test_features_of_one_gene_are_summed_and_controls_split_first() -> None:
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4, 5], [0, 1, 0, 0, 7]], dtype=np.int32))
    panel = build_gene_panel(["EPCAM", "TACSTD1", "GFAP", "NegPrb1", "Nope1"],
                             ["EPCAM", "TACSTD1", "GFAP", "NegPrb1", "Nope1"], counts)
    assert panel.genes["gene_id"].tolist() == [EPCAM, GFAP, "unresolved:human:Nope1"]
    assert panel.counts.toarray().tolist() == [[3, 3, 5], [1, 0, 7]]
    assert panel.control_counts["negative_probe"].tolist() == [4, 0]
    assert gene_qc(panel.genes) == {"qc_genes_resolved_fraction": 2 / 3,
                                    "genes_unresolved": ["Nope1"]}


def test_mixed_species_panel_is_reported_not_guessed() -> None:
    names = ["EPCAM", "GFAP", "KRT8", "Gfap", "Epcam", "Krt8", PBSN + ".2"]
    genes = resolve_features(names, names)
    assert infer_species(genes) == "mixed"
    # symbols are not given a species: they stay unresolved under the 'mixed' key
    assert genes["gene_id"].tolist()[:6] == [f"unresolved:mixed:{n}" for n in names[:6]]
    assert genes["gene_id"].iat[6] == PBSN  # an Ensembl id names its own species
    assert resolve_features(["EPCAM", "GFAP", "KRT8", "Gfap"], ["EPCAM", "GFAP", "KRT8", "Gfap"])[
        "species"].tolist() == ["human"] * 3 + ["human"]  # one stray mouse name: a human panel


def _corpus_with_two_species(root: Path) -> Path:
    corpus = Corpus.open(root, create=True)
    human = resolve_features(["EPCAM", "GFAP", "APOL1"], ["EPCAM", "GFAP", "APOL1"])
    mouse = resolve_features(["Epcam", "Gfap", "Pbsn"], ["Epcam", "Gfap", "Pbsn"])
    write_counts(corpus, "human", human, sp.csr_matrix(np.array([[1, 2, 3], [4, 0, 6]])))
    write_counts(corpus, "mouse", mouse, sp.csr_matrix(np.array([[10, 20, 30], [0, 50, 60]])))
    return root


def test_homolog_space_shares_columns_of_one_to_one_orthologs(tmp_path: Path) -> None:
    root = _corpus_with_two_species(tmp_path / "c")
    groups = reference().genes["homolog_group"]
    assert groups[row(EPCAM)] == groups[row(MOUSE_EPCAM)] >= 0
    assert groups[row(APOL1)] == groups[row(PBSN)] == -1
    per_gene = PairDataset(root, shuffle="none")
    assert per_gene.genes["gene_id"].tolist() == [APOL1, EPCAM, GFAP, PBSN, MOUSE_GFAP,
                                                  MOUSE_EPCAM]  # stable index order
    ds = PairDataset(root, gene_space="homolog", shuffle="none")
    epcam, gfap = f"homolog:{groups[row(EPCAM)]}", f"homolog:{groups[row(GFAP)]}"
    assert ds.genes["gene_id"].tolist() == [APOL1, epcam, gfap, PBSN]
    assert ds.genes["species"].tolist() == ["human", "human+mouse", "human+mouse", "mouse"]
    assert ds.genes["symbol"].tolist() == ["APOL1", "EPCAM", "GFAP", "Pbsn"]
    samples = {(s["section_id"], int(s["pair_index"])): s for s in ds}
    human0, mouse1 = samples[("human", 0)], samples[("mouse", 1)]
    assert human0["expression"].tolist() == [[3, 1, 2, 0]]
    assert mouse1["expression"].tolist() == [[0, 0, 50, 60]]
    assert human0["panel_mask"].tolist() == [True, True, True, False]
    assert mouse1["panel_mask"].tolist() == [False, True, True, True]
    assert PairDataset(root, genes="homolog:all").genes["gene_id"].tolist() == \
        ds.genes["gene_id"].tolist()
    top = PairDataset(root, genes="homolog:hvg:2").genes["gene_id"].tolist()
    assert len(top) == 2 and set(top) <= set(ds.genes["gene_id"])
    listed = PairDataset(root, genes=["GFAP", "Pbsn"], gene_space="homolog")
    assert listed.genes["gene_id"].tolist() == [gfap, PBSN]


def test_all_unresolvable_panel_still_builds_and_qc_says_so(tmp_path: Path) -> None:
    names = [f"zzNoGene{i}" for i in range(5)]
    panel = build_gene_panel(names, names, sp.csr_matrix(np.eye(5, dtype=np.int32)))
    assert not panel.genes["resolved"].any()
    corpus = Corpus.open(tmp_path / "c", create=True)
    committed = write_counts(corpus, "bad", panel.genes, panel.counts, species="human")
    assert committed["qc_genes_resolved_fraction"] == 0.0
    assert committed["genes_unresolved"] == sorted(names)
    sections = corpus.sections().set_index("section_id")
    assert sections.loc["bad", "genes_unresolved"].tolist() == sorted(names)
    ds = PairDataset(tmp_path / "c", shuffle="none")
    assert ds.genes["gene_id"].tolist() == sorted(
        (f"unresolved:unknown:{n}" for n in names), key=tail_index)
    assert sum(float(s["expression"].sum()) for s in ds) == 5.0


def _downgrade_to_format_1(root: Path, old_vocabulary: list[tuple[str, str, str | None]]) -> None:
    """Turn a corpus into the format-1 layout: build-order indices 0..n-1 in genes.parquet.

    Format-1 corpora predate commit records and fragments: the fragments are merged into the
    tables first, then the record goes too.
    """
    Corpus.open(root).compact()
    (root / "commit.json").unlink()
    meta = json.loads((root / "corpus.json").read_text())
    meta["format_version"] = 1
    del meta["gene_reference"]
    (root / "corpus.json").write_text(json.dumps(meta, sort_keys=True))
    gene_id, symbol, species = zip(*old_vocabulary, strict=True)
    pq.write_table(pa.table({
        "index": pa.array(np.arange(len(gene_id), dtype=np.int32)),
        "gene_id": pa.array(gene_id), "symbol": pa.array(symbol),
        "ensembl_id": pa.array([g if g.startswith("ENS") else None for g in gene_id],
                               pa.string()),
        "species": pa.array(species), "kind": pa.array(["gene"] * len(gene_id)),
    }), root / "genes.parquet")


def _commit_old(corpus: Corpus, section_id: str, units: list[dict[int, int]]) -> None:
    """Commit units whose gene_idx are OLD (format 1) indices."""
    from histmol.shards.shard_writer import SectionShardWriter

    staging = corpus.staging_dir(section_id)
    with SectionShardWriter(staging, patch_px=16, pairs_per_shard=2) as writer:
        for i, unit in enumerate(units):
            genes = sorted(unit)
            writer.add_pair(np.full((16, 16, 3), 50 + i, np.uint8), {
                "unit_id": [f"{section_id}-{i}"],
                "x_in_patch_px": np.array([8.0], np.float32),
                "y_in_patch_px": np.array([8.0], np.float32),
                "gene_idx": [np.array(genes, np.int32)],
                "counts": [np.array([unit[g] for g in genes], np.int32)],
            })
    panel = sorted({g for u in units for g in u})
    corpus.commit_section(section_id, staging, records=writer.close(), row={
        "platform": "old", "panel": panel, "config_hash": "c", "input_fingerprint": section_id})


def test_format_1_corpus_is_refused_then_migrated_resumably(tmp_path: Path) -> None:
    root = tmp_path / "old"
    corpus = Corpus.open(root, create=True)
    # old vocabulary in build order: Visium's Ensembl id, CosMx's symbol and alias of the same
    # gene, a mouse gene, an unknown name
    old = [(EPCAM, "EPCAM", "human"), ("EPCAM", "EPCAM", "human"),
           ("TACSTD1", "TACSTD1", "human"), ("Gfap", "Gfap", "mouse"),
           ("zzOld", "zzOld", "human")]
    _commit_old(corpus, "visium", [{0: 5}, {0: 1, 4: 2}, {4: 9}])
    _commit_old(corpus, "cosmx", [{1: 3, 2: 4}, {2: 1}])
    _commit_old(corpus, "mouse", [{3: 8}])
    images = {p: p.read_bytes() for p in (root / "shards").rglob("*") if p.is_file()
              and p.suffix != ".parquet"}
    _downgrade_to_format_1(root, old)
    with pytest.raises(CorpusError, match=f"histmol migrate {root}"):
        Corpus.open(root)
    with pytest.raises(CorpusError, match="histmol migrate"):
        PairDataset(root)
    # a crash after the first units file: the rerun finishes, skipping the done file
    copy = tmp_path / "crashed"
    shutil.copytree(root, copy)
    import histmol.shards.migrate as migrate

    real, calls = migrate._rewrite_units, []

    def crash_after_one(path: Path, mapping: np.ndarray) -> tuple[str, int]:
        if calls:
            raise OSError("disk gone")
        calls.append(path)
        return real(path, mapping)

    migrate._rewrite_units = crash_after_one  # type: ignore[assignment]
    try:
        with pytest.raises(OSError, match="disk gone"):
            migrate_corpus(copy)
    finally:
        migrate._rewrite_units = real  # type: ignore[assignment]
    assert (copy / ".migrate.json").exists()
    with pytest.raises(CorpusError, match="histmol migrate"):
        Corpus.open(copy)  # half-migrated: still refused
    resumed = migrate_corpus(copy)
    assert (resumed["parts"], resumed["parts_done_before"]) == (3, 1)
    stats = migrate_corpus(root)
    assert stats == {"parts": 4, "parts_done_before": 0, "genes_resolved": 4,
                     "genes_unresolved": 1}
    for name in ("genes.parquet", "sections.parquet", "manifest.parquet", "corpus.json"):
        assert (copy / name).read_bytes() == (root / name).read_bytes()
    assert not (root / ".migrate.json").exists()
    assert migrate_corpus(root) == {"parts": 0, "parts_done_before": 0, "genes_resolved": 0,
                                    "genes_unresolved": 0}
    migrated = Corpus.open(root)
    sections = migrated.sections().set_index("section_id")
    unknown = tail_index("unresolved:human:zzOld")
    assert sections.loc["visium", "panel"].tolist() == [row(EPCAM), unknown]
    assert sections.loc["cosmx", "panel"].tolist() == [row(EPCAM)]  # EPCAM + alias: one gene
    assert sections.loc["mouse", "panel"].tolist() == [row(MOUSE_GFAP)]
    ds = PairDataset(root, shuffle="none")
    assert ds.genes["gene_id"].tolist() == [EPCAM, MOUSE_GFAP, "unresolved:human:zzOld"]
    got = {(s["section_id"], int(s["part"]) * 2 + int(s["pair_index"])): s["expression"].tolist()
           for s in ds}
    assert got[("cosmx", 0)] == [[7, 0, 0]]  # EPCAM 3 + TACSTD1 4 summed
    assert got[("visium", 1)] == [[1, 0, 2]] and got[("mouse", 0)] == [[0, 8, 0]]
    for path, data in images.items():  # JPEG shards untouched
        assert path.read_bytes() == data
    # validate's gene checks pass (these hand-made units lack the builder's other columns)
    problems = validate_corpus(root)
    assert problems and not [p for p in problems if "gene" in p.message or "panel" in p.message]
    frame = pd.read_parquet(root / "genes.parquet")
    assert frame["index"].is_monotonic_increasing and frame["index"].iat[-1] == unknown
