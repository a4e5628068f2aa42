"""`histmol demo`: generate sample bundles on synthetic slides, build them, return the corpus.

Everything is generated locally (nothing is downloaded): two slides, a Visium bundle in the
Space Ranger 2.x layout with an HDF5 matrix, one in the 1.x layout with an mtx folder, and a
legacy ST bundle with a spot-detector selection file. The bundles' native frames are rotated
and mirrored relative to the slides; the generator writes the true transform beside each bundle
and the builds use it, as a user would pass `--transform`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.synth import SyntheticSlide, make_slide, write_st_bundle, write_visium_bundle

SLIDE_MPP = 0.25  # a 40x-like scan, so patches at 0.5 um/px come from pyramid level 1
DEMO_SLIDE_UM = (3200.0, 2800.0)


def generate_demo_inputs(root: Path, *, seed: int = 0) -> list[SectionRequest]:
    """Write slides and bundles under `root`; return the requests that build them.

    A marker written last records the seed: a later call with the same seed reuses the inputs
    untouched (so their fingerprints, and a re-run's skipping, hold); anything else, including
    debris of an interrupted generation, is generated afresh.
    """
    slides, bundles = root / "slides", root / "bundles"
    crc, crc2, st_dir = (
        bundles / name for name in ("visium-crc-01", "visium-crc-02", "st-breast-01")
    )
    marker = root / "inputs.json"
    wanted = json.dumps({"generator": "histmol demo", "seed": seed})
    if not (marker.exists() and marker.read_text() == wanted):
        marker.unlink(missing_ok=True)
        for stale in (slides, bundles):
            shutil.rmtree(stale, ignore_errors=True)
        slides.mkdir(parents=True)
        slide_a = _slide(slides / "slide-a.tif", seed)
        slide_b = _slide(slides / "slide-b.tif", seed + 1)
        write_visium_bundle(crc, slide_a, layout="spaceranger2", matrix="h5", seed=seed)
        write_visium_bundle(crc2, slide_b, layout="spaceranger1", matrix="mtx", seed=seed + 1)
        write_st_bundle(st_dir, slide_a, image_mpp=0.5, seed=seed + 2, sample="breast01")
        marker.write_text(wanted)
    return [
        SectionRequest(
            "visium",
            crc / "outs",
            slides / "slide-a.tif",
            "crc-01",
            crc / "native_to_wsi.csv",
            {"tissue": "colon", "species": "human", "patient_id": "p1"},
        ),
        SectionRequest(
            "visium",
            crc2 / "outs",
            slides / "slide-b.tif",
            "crc-02",
            crc2 / "native_to_wsi.csv",
            {"tissue": "colon", "species": "human", "patient_id": "p2"},
        ),
        SectionRequest(
            "st",
            st_dir,
            st_dir / "breast01.jpg",
            "st-breast-01",
            None,
            {"tissue": "breast", "species": "human", "patient_id": "p3"},
        ),
    ]


def _slide(path: Path, seed: int) -> SyntheticSlide:
    width_um, height_um = DEMO_SLIDE_UM
    return make_slide(path, width_um=width_um, height_um=height_um, mpp=SLIDE_MPP, seed=seed)


def run_demo(
    out: Path, *, seed: int = 0, threads: int = 2, log: Callable[[str], None] = print
) -> Path:
    """Generate the demo inputs under `out` and build them into `out/corpus`; return its path.

    The sections are built here, one after another, by `histmol.build.build_section` (no
    Prefect): an unchanged section is skipped on a re-run.
    """
    out = Path(out)
    log(f"generating synthetic slides and bundles under {out}/ ...")
    requests = generate_demo_inputs(out, seed=seed)
    corpus = out / "corpus"
    log(f"building {len(requests)} sections into {corpus}/ ...")
    for request in requests:
        result = build_section(request, corpus, BuildConfig(), threads=threads)
        log(
            f"  {result.section_id}: {result.status}, {result.n_pairs} pairs, "
            f"{result.n_units} units"
        )
    return corpus
