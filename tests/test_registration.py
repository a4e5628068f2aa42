"""Registration: transform checks, units inside the image, mpp sources and cross-checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histmol.errors import RegistrationError, WSIError
from histmol.registration import (
    SlideGeometry,
    apply_affine,
    array_scale,
    check_affine,
    read_transform_csv,
    register,
)
from histmol.section import ArrayLattice, Provenance, Section


def hex_grid(rows: int, cols: int, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Visium-like hexagonal centres with centre-to-centre distance `pitch`."""
    r, c = np.mgrid[0:rows, 0:cols]
    x = (c * pitch + (r % 2) * pitch / 2).ravel().astype(float)
    y = (r * pitch * np.sqrt(3) / 2).ravel().astype(float)
    return x, y


def make_section(
    x: np.ndarray, y: np.ndarray, columns: dict[str, np.ndarray] | None = None, **kwargs: object
) -> Section:
    n = len(x)
    fields = dict(
        section_id="s1", platform="visium",
        units=pd.DataFrame(
            {"unit_id": [f"u{i}" for i in range(n)], "x_native": x, "y_native": y,
             **(columns or {})}
        ),
        counts=sp.csr_matrix(np.ones((n, 2), dtype=np.int32)),
        genes=pd.DataFrame(
            {"gene_id": ["A", "B"], "symbol": ["A", "B"], "ensembl_id": [None, None]}
        ),
        wsi_path=Path("slide.tif"), unit_shape="circle", unit_size_um=55.0, pitch_um=100.0,
        default_mode="spot", provenance=Provenance("visium", "1", "b", ()),
    )
    fields.update(kwargs)
    return Section(**fields)  # type: ignore[arg-type]


SLIDE = SlideGeometry(Path("slide.tif"), 10_000, 10_000, embedded_mpp=0.5)


def test_identity_transform_keeps_coordinates_and_takes_embedded_mpp() -> None:
    x, y = hex_grid(5, 6, 200.0)  # 100 um pitch at 0.5 um/px = 200 px
    reg = register(make_section(x + 100, y + 100), SLIDE)
    np.testing.assert_array_equal(reg.x_wsi_px, x + 100)
    np.testing.assert_array_equal(reg.y_wsi_px, y + 100)
    assert reg.mpp == 0.5 and reg.mpp_source == "embedded"
    assert reg.qc["mpp_estimated_from_pitch"] == pytest.approx(0.5)
    assert reg.qc["mpp_embedded_vs_pitch"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(reg.x_um, (x + 100) * 0.5)


def test_rotation_and_flip_are_applied_exactly_and_recorded_as_mirrored() -> None:
    x, y = hex_grid(4, 4, 200.0)
    # native (x, y) -> wsi (y + 500, x + 300): a 90 degree rotation combined with a flip.
    matrix = np.array([[0.0, 1.0, 500.0], [1.0, 0.0, 300.0], [0.0, 0.0, 1.0]])
    reg = register(make_section(x, y, native_to_wsi=matrix), SLIDE)
    np.testing.assert_array_equal(reg.x_wsi_px, y + 500)
    np.testing.assert_array_equal(reg.y_wsi_px, x + 300)
    assert reg.qc["transform_mirrored"] is True
    assert reg.qc["transform_det"] == pytest.approx(-1.0)


def test_explicit_transform_overrides_section_transform() -> None:
    x, y = hex_grid(3, 3, 100.0)
    section = make_section(x, y, native_to_wsi=np.diag([9.0, 9.0, 1.0]))
    reg = register(section, SLIDE, native_to_wsi=np.diag([2.0, 2.0, 1.0]))
    np.testing.assert_array_equal(reg.x_wsi_px, 2 * x)


def test_singular_transform_fails() -> None:
    x, y = hex_grid(3, 3, 200.0)
    singular = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(RegistrationError, match="singular"):
        register(make_section(x, y), SLIDE, native_to_wsi=singular)


def test_projective_transform_is_refused() -> None:
    with pytest.raises(RegistrationError, match="not affine"):
        check_affine(np.array([[1.0, 0, 0], [0, 1.0, 0], [0.001, 0, 1.0]]))


def test_units_outside_the_image_fail_with_the_count() -> None:
    x, y = hex_grid(3, 3, 200.0)
    swapped = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 9_800.0], [0.0, 0.0, 1.0]])
    with pytest.raises(RegistrationError, match=r"slide.tif: 6 of 9 unit centres fall outside"):
        register(make_section(x, y), SLIDE, native_to_wsi=swapped)


def test_embedded_mpp_disagreeing_with_pitch_fails_unless_overridden() -> None:
    x, y = hex_grid(5, 5, 180.0)  # pitch says 100/180 = 0.556 um/px, file says 0.5: 10 % off
    with pytest.raises(RegistrationError, match=r"embedded mpp 0.5000 um/px disagrees by 10.0%"):
        register(make_section(x, y), SLIDE)
    reg = register(make_section(x, y), SLIDE, mpp=0.556)
    assert reg.mpp == 0.556 and reg.mpp_source == "user"


def test_scalefactor_mpp_goes_through_the_transform_scale() -> None:
    x, y = hex_grid(5, 5, 200.0)  # native px of a 0.5 um/px fullres image
    section = make_section(x, y, native_um_per_unit=0.5, native_to_wsi=np.diag([0.25, 0.25, 1.0]))
    slide = SlideGeometry(Path("lowres.png"), 2_000, 2_000, embedded_mpp=None)
    reg = register(section, slide)
    assert reg.mpp_source == "scalefactors"
    assert reg.mpp == pytest.approx(2.0)


def test_pitch_estimate_is_used_when_nothing_else_is_known() -> None:
    x, y = hex_grid(6, 6, 40.0)
    slide = SlideGeometry(Path("he.jpg"), 1_000, 1_000, embedded_mpp=None,
                          mpp_discard_reason="72 dpi")
    reg = register(make_section(x + 10, y + 10), slide)
    assert reg.mpp_source == "estimated_from_pitch"
    assert reg.mpp == pytest.approx(2.5)
    assert reg.qc["mpp_embedded_discarded"] == "72 dpi"


def test_no_mpp_source_names_the_file() -> None:
    slide = SlideGeometry(Path("he.jpg"), 1_000, 1_000, embedded_mpp=None,
                          mpp_discard_reason="72 dpi")
    section = make_section(np.array([10.0]), np.array([10.0]))
    with pytest.raises(WSIError, match=r"he.jpg: no usable pixel size: 72 dpi"):
        register(section, slide)


def test_transform_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("0,-1,100.5\n1,0,3\n0,0,1\n")
    matrix = read_transform_csv(path)
    np.testing.assert_array_equal(matrix, [[0, -1, 100.5], [1, 0, 3], [0, 0, 1]])
    xs, ys = apply_affine(matrix, np.array([2.0]), np.array([5.0]))
    assert (xs[0], ys[0]) == (95.5, 5.0)
    (tmp_path / "bad.csv").write_text("1,0\n0,1\n")
    with pytest.raises(RegistrationError, match=r"bad.csv: transform must be 3 rows of 3 numbers"):
        read_transform_csv(tmp_path / "bad.csv")


def test_pitch_estimate_is_unbiased_on_noisy_positions() -> None:
    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.arange(30), np.arange(30))
    x = gx.ravel() * 400.0 + rng.normal(0, 8, gx.size) + 500
    y = gy.ravel() * 400.0 + rng.normal(0, 8, gx.size) + 500
    slide = SlideGeometry(Path("he.jpg"), 13_000, 13_000, embedded_mpp=None)
    reg = register(make_section(x, y, pitch_um=200.0), slide)
    assert reg.mpp == pytest.approx(0.5, rel=0.005)


VISIUM_LATTICE = ArrayLattice("array_col", "array_row", 50.0, 50.0 * np.sqrt(3))


def visium_spots(rows: np.ndarray, cols: np.ndarray, px_per_um: float, angle: float) -> tuple:
    """Pixel centres of Visium spots (array_row, array_col) under a rotation and scale."""
    u, v = cols * 50.0, rows * 50.0 * np.sqrt(3)
    c, s = np.cos(angle), np.sin(angle)
    return px_per_um * (c * u - s * v) + 3000.0, px_per_um * (s * u + c * v) + 400.0


def test_scattered_spots_take_the_exact_pitch_from_their_array_indices() -> None:
    # 7 spots scattered over a Visium array (odd rows hold odd columns): the nearest kept
    # neighbour is many pitches away, so the neighbour estimate is wildly off.
    rows = np.array([0, 3, 11, 20, 37, 52, 70])
    cols = np.array([4, 17, 33, 2, 91, 60, 110])
    x, y = visium_spots(rows, cols, px_per_um=2.0, angle=0.3)
    units = {"array_row": rows, "array_col": cols}
    section = make_section(x, y, units, array_lattice=VISIUM_LATTICE)
    slide = SlideGeometry(Path("slide.tif"), 30_000, 30_000, embedded_mpp=0.5)
    reg = register(section, slide)
    assert reg.qc["pitch_source"] == "array_index"
    assert reg.qc["mpp_estimated_from_pitch"] == pytest.approx(0.5, rel=1e-9)
    assert reg.qc["mpp_embedded_vs_pitch"] == pytest.approx(0.0, abs=1e-9)
    assert reg.qc["array_fit_residual_wsi_px"] == pytest.approx(0.0, abs=1e-6)
    # without the indices the same spots fail the cross-check by a wide margin
    with pytest.raises(RegistrationError, match=r"disagrees by \d{3,}\.\d%.*100 um unit pitch"):
        register(make_section(x, y), slide)


def test_array_pitch_disagreeing_with_the_file_names_the_indices() -> None:
    rows, cols = np.array([0, 2, 5]), np.array([0, 10, 3])
    x, y = visium_spots(rows, cols, px_per_um=2.2, angle=0.0)  # 0.4545 um/px vs 0.5 in file
    section = make_section(x, y, {"array_row": rows, "array_col": cols},
                           array_lattice=VISIUM_LATTICE)
    with pytest.raises(RegistrationError, match=r"disagrees by 10.0%.*array indices \(array_col"):
        register(section, SLIDE)


def test_array_scale_on_units_along_one_line_and_on_one_position() -> None:
    t = np.array([0.0, 3.0, 10.0])
    scale, residual = array_scale(t * 8.0, np.zeros(3), 100 + 0.6 * t * 8.0 * 2.5,
                                  50 + 0.8 * t * 8.0 * 2.5)
    assert scale == pytest.approx(2.5) and residual == pytest.approx(0.0, abs=1e-9)
    assert array_scale(np.ones(4), np.ones(4), np.arange(4.0), np.arange(4.0)) is None


def test_array_lattice_columns_must_exist() -> None:
    with pytest.raises(ValueError, match=r"array lattice columns \['array_col', 'array_row'\]"):
        make_section(np.zeros(2), np.ones(2), array_lattice=VISIUM_LATTICE)
