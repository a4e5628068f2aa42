"""`register: auto` end to end: a synthetic Visium bundle whose images are the WSI, turned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.errors import RegistrationError
from histmol.manifest import ManifestError, load_manifest
from histmol.registration import read_transform_csv
from histmol.synth import GroundTruth, SyntheticSlide, make_slide, write_visium_bundle

CONFIG = BuildConfig(patch_px=64, register="auto")


@pytest.fixture(scope="module")
def visium(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, GroundTruth]:
    root = tmp_path_factory.mktemp("synthetic")
    slide = make_slide(root / "slide.tif", width_um=1400.0, height_um=1200.0, mpp=0.25, seed=3)
    truth = write_visium_bundle(root / "visium", slide, seed=3, n_genes=60)
    return slide, truth


def test_auto_registration_places_spots_within_a_micrometre(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    # the bundle's hires PNG is the WSI rotated a quarter turn and mirrored (synth default);
    # no transform is given: the build finds it and records its confidence
    slide, truth = visium
    out = tmp_path / "corpus"
    result = build_section(SectionRequest("visium", truth.bundle, slide.path, "auto"), out, CONFIG)
    found = np.asarray(result.qc["native_to_wsi"]).reshape(3, 3)
    expected = read_transform_csv(truth.transform_path)  # = truth.native_to_wsi
    spots = np.vstack([truth.x_native, truth.y_native, np.ones(len(truth.x_native))])
    error_um = np.hypot(*((found - expected) @ spots)[:2]) * slide.mpp
    assert error_um.max() < 1.0
    assert result.qc["qc_register"] == "auto"
    assert result.qc["qc_register_image"] == "tissue_hires_image.png"
    assert result.qc["qc_register_confidence"] > 0.6
    assert result.qc["qc_register_flipped"] is True
    assert (out / "qc" / "auto" / "registration.png").stat().st_size > 10_000


@pytest.mark.slow
def test_auto_registration_refuses_another_slide_and_writes_nothing(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    _, truth = visium
    other = make_slide(tmp_path / "other.tif", width_um=1400.0, height_um=1200.0, mpp=0.25, seed=9)
    out = tmp_path / "corpus"
    with pytest.raises(RegistrationError, match=r"confidence -?0\.\d+ .* under 0.3.*--landmarks"):
        build_section(SectionRequest("visium", truth.bundle, other.path, "wrong"), out, CONFIG)
    assert not (out / "corpus.json").exists()
    assert (out / "qc" / "wrong" / "registration.png").exists()  # the curator sees why


def test_auto_registration_with_a_transform_is_refused(
    visium: tuple[SyntheticSlide, GroundTruth], tmp_path: Path
) -> None:
    slide, truth = visium
    request = SectionRequest("visium", truth.bundle, slide.path, "both", truth.transform_path)
    with pytest.raises(Exception, match=r"register auto finds the transform itself"):
        build_section(request, tmp_path / "c", CONFIG)


def test_manifest_field_register_auto_reaches_the_build_config(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "defaults:\n  register: auto\n  min_register_confidence: 0.5\n"
        "sections:\n"
        "  - {section_id: a, platform: visium, bundle: b, wsi: w.tif}\n"
        "  - {section_id: b, platform: visium, bundle: b, wsi: w.tif, register: given}\n"
    )
    plan = load_manifest(tmp_path / "m.yaml")
    assert [c.register for c in plan.configs] == ["auto", "given"]
    assert plan.configs[0].min_register_confidence == 0.5
    (tmp_path / "bad.yaml").write_text(
        "sections:\n  - {section_id: a, platform: visium, bundle: b, wsi: w.tif, register: maybe}\n"
    )
    with pytest.raises(ManifestError, match=r"register"):
        load_manifest(tmp_path / "bad.yaml")
