"""One small real corpus for the QC, report, validate, export and README tests, built once per run.

Built with `histmol.build.build_section` from synthetic bundles on one small slide: a Visium
section in spot mode (``crc-01``), the same bundle in grid mode with a strict tissue threshold so
patches are dropped (``crc-02``), a legacy ST section (``st-01``) and a failed one (``bad-01``: its
image is too coarse for the patch resolution). Tests that damage the corpus copy it first.
`shared_figures` draws two sections' QC figures once.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import QCError
from histmol.synth import make_slide, write_st_bundle, write_visium_bundle

SLIDE_UM = (1400.0, 1200.0)
SLIDE_MPP = 0.5


@dataclass(frozen=True)
class QcCorpus:
    """The built corpus and the images its sections were built on."""

    root: Path
    slide: Path  # crc-01 and crc-02
    st_image: Path  # st-01
    sections: tuple[str, ...] = ("bad-01", "crc-01", "crc-02", "st-01")

    def copy(self, dest: Path) -> Path:
        """A private copy of the corpus (for tests that modify it)."""
        return Path(shutil.copytree(self.root, dest, symlinks=True))


_BUILT: dict[str, QcCorpus] = {}
_FIGURES: dict[str, Path] = {}


def build_qc_corpus(base: Path) -> QcCorpus:
    """Generate the inputs under `base` and build the four sections into ``base/corpus``."""
    slide = make_slide(
        base / "slide.tif", width_um=SLIDE_UM[0], height_um=SLIDE_UM[1], mpp=SLIDE_MPP, seed=3
    )
    write_visium_bundle(base / "visium", slide, seed=1, n_genes=40)
    write_st_bundle(base / "st", slide, image_mpp=SLIDE_MPP, seed=2, n_genes=30, sample="st1")
    write_st_bundle(base / "st-coarse", slide, image_mpp=1.0, seed=4, n_genes=30, sample="coarse")
    root = base / "corpus"
    visium = (base / "visium" / "outs", slide.path)
    transform = base / "visium" / "native_to_wsi.csv"
    human_colon = {"tissue": "colon", "species": "human", "patient_id": "p1"}
    build_section(SectionRequest("visium", *visium, "crc-01", transform, human_colon), root)
    build_section(
        SectionRequest("visium", *visium, "crc-02", transform, human_colon),
        root,
        BuildConfig(mode="grid", min_tissue_fraction=0.7),
    )
    st_image = base / "st" / "st1.jpg"
    build_section(
        SectionRequest(
            "st", base / "st", st_image, "st-01", None, {"tissue": "breast", "species": "human"}
        ),
        root,
    )
    with pytest.raises(QCError, match="too coarse"):
        build_section(
            SectionRequest(
                "st",
                base / "st-coarse",
                base / "st-coarse" / "coarse.jpg",
                "bad-01",
                None,
                {"tissue": "breast"},
            ),
            root,
            record_failure=True,
        )
    return QcCorpus(root, slide.path, st_image)


def shared_qc_corpus(factory: pytest.TempPathFactory) -> QcCorpus:
    """The session's QC corpus (built on first use; treat it as read-only)."""
    if "corpus" not in _BUILT:
        _BUILT["corpus"] = build_qc_corpus(factory.mktemp("qc-corpus"))
    return _BUILT["corpus"]


def shared_figures(factory: pytest.TempPathFactory) -> Path:
    """A figures folder holding crc-01's figures (drawn on the WSI) and st-01's (on patches)."""
    if "figures" not in _FIGURES:
        from histmol.qc.figures import write_section_figures

        qc = shared_qc_corpus(factory)
        folder = factory.mktemp("qc-figures")
        write_section_figures(qc.root, "crc-01", folder, slide=qc.slide)
        write_section_figures(qc.root, "st-01", folder)
        _FIGURES["figures"] = folder
    return _FIGURES["figures"]
