"""The real fixtures in ONE corpus: shared genes land on one index, resolution is reported, and
any build order or parallelism gives the same bytes.

Each fixture is read by its adapter (the real feature tables); its first units are written as
pairs with flat synthetic patches (`gene_space_helpers.write_counts`), exactly as the builder
maps genes. A human Ensembl-keyed panel is missing from the fixtures (Visium/Xenium ones are
mouse), so one is made from the synthetic generator's real GRCh38 marker ids through the same
`build_gene_panel` path every adapter uses.

Resolved-fraction floors are the measured values rounded down (reference of this histmol):
the features left unresolved are genes the reference cannot name, not parsing slips:
- ST MOB1 0.997: 3 of 1000 Ensembl ids retired before Ensembl 110 (ENSMUSG00000075014, ...).
- CosMx 0.996: HLA.DPA1/HLA.DPB1 (symbols shared by several haplotype copies) and MTRNR2L1.
- MERSCOPE mouse brain 0.986: six symbols renamed since the panel was made (Gpr1 -> Cmklr2,
  Fpr-s1, ...); no registry package ships mouse synonyms.
- Slide-seq 0.976: nine renamed mouse symbols (Park2 -> Prkn, Qk -> Qki, Large -> Large1, ...).
- Stereo-seq 0.93: GEM gene ids are symbols of an older mouse annotation (Gm genes, RIKEN
  clones since renamed or retired).
- Visium (mouse), Xenium (mouse), MERSCOPE ovarian: 1.0.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
from conftest import fixture_path
from gene_space_helpers import write_counts

from histmol.data import PairDataset
from histmol.gene_reference import reference
from histmol.section import Section
from histmol.shards.corpus import Corpus
from histmol.synth.expression import MARKERS
from platform_adapters import cosmx, merscope, slide_seq, st, stereo_seq, visium, xenium
from platform_adapters._common import build_gene_panel

N_UNITS = 12
FLOORS = {"visium": 1.0, "xenium": 1.0, "st": 0.997, "cosmx": 0.996, "merscope-ovary": 1.0,
          "merscope-brain": 0.986, "slide-seq": 0.976, "stereo-seq": 0.93, "visium-human": 1.0}
SPECIES = {"visium": "mouse", "xenium": "mouse", "st": "mouse", "cosmx": "human",
           "merscope-ovary": "human", "merscope-brain": "mouse", "slide-seq": "mouse",
           "stereo-seq": "mouse", "visium-human": "human"}


def _read_all(tmp: Path) -> dict[str, Section]:
    image = tmp / "he.tif"
    tifffile.imwrite(image, np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    visium_dir = fixture_path("visium_seurat")
    mob1 = fixture_path("legacy_st_stutility_MOB1/counts")
    brain = fixture_path("merscope_giotto_mousebrain/Raw")
    return {
        "visium": visium.read(visium_dir, wsi=visium_dir / "spatial/tissue_lowres_image.png"),
        "xenium": xenium.read(fixture_path("xenium_mousebrain_subset"), wsi=image,
                              native_to_wsi=np.eye(3)),
        "st": st.read(mob1, wsi=mob1 / "MOB1.jpg"),
        "cosmx": cosmx.read(fixture_path(
            "cosmx_lung_p9s1_subset/NanostringCosMx_HumanLung_P9S1_Small"), wsi=image),
        "merscope-ovary": merscope.read(
            fixture_path("merscope_ovarian_p2s2_subset/VizgenMERSCOPE"), wsi=image),
        "merscope-brain": merscope.read(brain, wsi=image, units="bins",
                                        transcripts=brain / "vizgen_transcripts.gz"),
        "slide-seq": slide_seq.read(
            fixture_path("slideseq_spacexr_cerebellum/SpatialRNA/Vignette"), wsi=image),
        "stereo-seq": stereo_seq.read(fixture_path("stereoseq_spateo/bgi"), wsi=image),
    }


@pytest.fixture(scope="module")
def panels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pd.DataFrame,
                                                                         sp.csr_matrix]]:
    """Every fixture's resolved gene table and its first units' counts."""
    sections = _read_all(tmp_path_factory.mktemp("images"))
    out = {name: (s.genes, s.count_rows(np.arange(min(N_UNITS, s.n_units))))
           for name, s in sections.items()}
    markers = {symbol: ensembl for group in MARKERS.values() for symbol, ensembl in group.items()}
    ids = [f"{e}.{i % 3 + 1}" for i, e in enumerate(markers.values())]  # versioned, as 10x
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(2.0, (N_UNITS, len(ids))).astype(np.int32))
    panel = build_gene_panel(ids, list(markers), counts)
    out["visium-human"] = (panel.genes, panel.counts)
    return out


def _build(root: Path, panels: dict, order: list[str], threads: int = 1) -> Path:
    Corpus.open(root, create=True)

    def one(name: str) -> None:
        genes, counts = panels[name]
        with Corpus.open(root) as corpus:  # one Corpus (own lock fd) per task
            write_counts(corpus, name, genes, counts, platform=name, species=SPECIES[name])

    if threads == 1:
        for name in order:
            one(name)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, order))
    return root


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.mark.slow
def test_fixtures_meet_in_one_gene_space(panels: dict, tmp_path: Path) -> None:
    names = sorted(panels)
    root = _build(tmp_path / "one", panels, names)
    genes = Corpus.open(root).genes()
    index = dict(zip(genes["gene_id"], genes["index"], strict=True))
    sections = Corpus.open(root).sections().set_index("section_id")
    panel = {name: set(sections.loc[name, "panel"].tolist()) for name in names}
    ref = reference().genes
    # EPCAM: CosMx and MERSCOPE ovary by symbol, the human Visium panel by versioned Ensembl id
    epcam = index["ENSG00000119888"]
    assert epcam == int(ref.index[ref["ensembl_id"] == "ENSG00000119888"][0])
    assert "EPCAM" in set(panels["cosmx"][0]["feature"])
    assert {n for n in names if epcam in panel[n]} >= {"cosmx", "visium-human"}
    # Gfap: Xenium by Ensembl id, MERSCOPE mouse brain and Slide-seq by symbol
    gfap = index["ENSMUSG00000020932"]
    assert panels["xenium"][0].set_index("gene_id").loc["ENSMUSG00000020932", "feature"] == "Gfap"
    assert {n for n in names if gfap in panel[n]} >= {"xenium", "merscope-brain"}
    # human and mouse GFAP are two genes but one homolog group
    assert ref.loc[index["ENSG00000131095"], "homolog_group"] == ref.loc[gfap, "homolog_group"]
    for name in names:  # resolution is reported per section, above the measured floors
        fraction = sections.loc[name, "qc_genes_resolved_fraction"]
        unresolved = list(sections.loc[name, "genes_unresolved"])
        n_genes = sections.loc[name, "n_genes"]
        assert fraction >= FLOORS[name], (name, fraction, unresolved[:10])
        assert len(unresolved) == round((1 - fraction) * n_genes)
        assert sections.loc[name, "species"] == SPECIES[name]
    ds = PairDataset(root, genes=["ENSG00000119888"], shuffle="none")
    masked = {s["section_id"]: bool(s["panel_mask"][0]) for s in ds}
    assert {n for n, m in masked.items() if m} == {n for n in names if epcam in panel[n]}
    homolog = PairDataset(root, genes="homolog:all", shuffle="none")
    per_gene = PairDataset(root, genes="all", shuffle="none")
    assert len(homolog.genes) < len(per_gene.genes) == len(set().union(*panel.values()))


@pytest.mark.slow
def test_build_order_and_parallelism_give_identical_bytes(panels: dict, tmp_path: Path) -> None:
    names = sorted(panels)
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    reference_bytes = _bytes(_build(tmp_path / "sorted", panels, names))
    assert _bytes(_build(tmp_path / "shuffled", panels, shuffled)) == reference_bytes
    assert _bytes(_build(tmp_path / "two", panels, shuffled[::-1], threads=2)) == reference_bytes
