"""Automatic registration: synthetic truth (H&E, DAPI-like), real Visium images, refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fixture_path
from PIL import Image

from histmol.autoregister import DEFAULT_MIN_CONFIDENCE, autoregister
from histmol.synth.morphology import TissueModel
from histmol.synth.registration_pairs import (
    RegistrationCase,
    make_case,
    similarity,
    unrelated_case,
    warp_image,
)

SIDE = 1000  # model pixels at 1 um/px: a 1 mm field


@pytest.fixture(scope="module")
def tissue() -> tuple[TissueModel, np.ndarray]:
    model = TissueModel(SIDE, SIDE, mpp=1.0, seed=3, n_regions=4, label_um=16.0)
    return model, model.render(0, 0, SIDE, SIDE)


def run(case: RegistrationCase, **kwargs: object):  # noqa: ANN201
    return autoregister(case.moving, case.moving_to_native, case.fixed, case.fixed_to_wsi,
                        modality=case.modality, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seed", "known_scale"), [(11, True), (12, False)])
def test_he_rescan_is_recovered_within_one_wsi_pixel(
    tissue: tuple, seed: int, known_scale: bool
) -> None:
    # random angle and handedness, 80 % crop, other stain balance, blur and noise; the WSI is
    # 0.5 um/px: every unit centre of the moving frame lands within 1 WSI px of the truth.
    model, source = tissue
    case = make_case(model, source, np.random.default_rng(seed), modality="he")
    truth = np.linalg.inv(case.fixed_to_wsi) @ case.true_native_to_wsi @ case.moving_to_native
    scale = float(np.sqrt(abs(np.linalg.det(truth[:2, :2])))) if known_scale else None
    found = run(case, scale=scale)
    error = case.unit_error_wsi_px(found.native_to_wsi)
    assert error.max() < 1.0
    assert found.confidence > 0.6
    assert found.metrics["flipped"] == (np.linalg.det(truth[:2, :2]) < 0)


def test_dapi_against_hematoxylin_is_recovered_within_a_few_micrometres(tissue: tuple) -> None:
    model, source = tissue
    case = make_case(model, source, np.random.default_rng(5), modality="nuclei",
                     moving_um_per_px=(1.0, 3.0))
    found = run(case)
    error_um = case.unit_error_wsi_px(found.native_to_wsi) * 0.5
    assert error_um.max() < 3.0
    assert found.confidence > 0.6


def test_unrelated_images_score_far_below_the_threshold(tissue: tuple) -> None:
    model, source = tissue
    other = TissueModel(SIDE, SIDE, mpp=1.0, seed=8, n_regions=4, label_um=16.0)
    rng = np.random.default_rng(2)
    case = make_case(model, source, rng, modality="he")
    stranger = make_case(other, other.render(0, 0, SIDE, SIDE), rng, modality="he")
    found = run(unrelated_case(case, stranger))
    assert found.confidence < DEFAULT_MIN_CONFIDENCE / 2
    assert found.metrics["mask_dice"] > 0.5  # outlines alone would have passed


def test_quarter_turns_and_mirror_are_exact_on_the_pixel_grid(tissue: tuple) -> None:
    _, source = tissue
    fixed = source[::4, ::4]  # 250 px
    moving = np.ascontiguousarray(np.rot90(fixed, 1)[:, ::-1])  # a quarter turn, mirrored
    found = autoregister(moving, np.eye(3), fixed, np.eye(3), scale=1.0)
    # moving[i, j] = fixed[W-1-j, W-1-i]: continuous (x, y) -> (W - y, W - x)
    expected = np.array([[0.0, -1.0, 250.0], [-1.0, 0.0, 250.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(found.moving_to_fixed, expected, atol=0.02)
    assert found.metrics["flipped"] is True


@pytest.mark.parametrize("spatial", [
    "visium_seurat/spatial",
    "visium_spatialexperiment/section1/outs/spatial",
    "visium_spatialexperiment/section2/outs/spatial",
])
def test_real_visium_lowres_registers_to_a_rotated_rescaled_copy_within_a_lowres_pixel(
    spatial: str,
) -> None:
    folder = fixture_path(spatial)
    lowres = np.asarray(Image.open(folder / "tissue_lowres_image.png").convert("RGB"))
    scalef = json.loads((folder / "scalefactors_json.json").read_text())["tissue_lowres_scalef"]
    # the "WSI": the lowres image rotated by 37 degrees and enlarged 1.6x, on its own glass
    copy_to_lowres = np.linalg.inv(similarity(np.radians(37.0), 1.6, False, 420.0, -60.0))
    glass = np.median(np.concatenate([lowres[:10].reshape(-1, 3), lowres[-10:].reshape(-1, 3)]), 0)
    copy = warp_image(lowres, copy_to_lowres, (1100, 1100), 0.0)
    outside = warp_image(np.ones(lowres.shape[:2]), copy_to_lowres, (1100, 1100), 0.0) < 0.5
    copy[outside] = glass  # the glass goes on beyond the crop
    copy = copy.astype(np.uint8)
    moving_to_native = np.diag([1 / scalef, 1 / scalef, 1.0])
    found = autoregister(lowres, moving_to_native, copy, np.eye(3))
    spots = np.loadtxt(folder / "tissue_positions_list.csv", delimiter=",", usecols=(1, 4, 5))
    in_tissue = spots[spots[:, 0] == 1]
    native = np.vstack([in_tissue[:, 2], in_tissue[:, 1], np.ones(len(in_tissue))])
    truth = np.linalg.inv(copy_to_lowres) @ np.linalg.inv(moving_to_native)
    error_copy_px = np.hypot(*((found.native_to_wsi - truth) @ native)[:2])
    assert (error_copy_px / 1.6).max() < 1.0  # in lowres pixels
    assert found.confidence > DEFAULT_MIN_CONFIDENCE
