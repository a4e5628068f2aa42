"""platform_adapters.images: each platform's own image, reduced, and placed in its native frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile

from histmol.errors import BundleError, RegistrationError
from histmol.section import Provenance, Section
from platform_adapters.images import platform_image


def section(platform: str, folder: Path, files: tuple[str, ...] = ()) -> Section:
    return Section(
        section_id="s", platform=platform,
        units=pd.DataFrame({"unit_id": ["u"], "x_native": [0.0], "y_native": [0.0]}),
        counts=sp.csr_matrix(np.ones((1, 1), np.int32)),
        genes=pd.DataFrame({"gene_id": ["g"], "symbol": ["g"], "ensembl_id": [None]}),
        wsi_path=folder / "he.tif", unit_shape="circle", unit_size_um=10.0, pitch_um=None,
        default_mode="grid", provenance=Provenance(platform, "1", str(folder), files),
        native_um_per_unit=1.0,
    )


def test_xenium_dapi_is_read_from_a_pyramid_level_in_micrometres(tmp_path: Path) -> None:
    (tmp_path / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    (tmp_path / "morphology_focus").mkdir()
    level0 = np.arange(3000 * 4000, dtype=np.uint16).reshape(3000, 4000)
    with tifffile.TiffWriter(tmp_path / "morphology_focus" / "ch0000_dapi.ome.tif") as tif:
        tif.write(level0, subifds=1, tile=(256, 256))
        tif.write(level0[::2, ::2], subfiletype=1, tile=(256, 256))
    got = platform_image(section("xenium", tmp_path), max_side=1024)
    assert got.modality == "nuclei" and got.path.name == "ch0000_dapi.ome.tif"
    assert got.image.shape == (750, 1000)  # level 1 (2000 px), then 2 x 2 block means
    np.testing.assert_allclose(got.image_to_native, np.diag([0.2125 * 4, 0.2125 * 4, 1.0]))
    np.testing.assert_allclose(got.image[0, 0], level0[::2, ::2][:2, :2].mean(), atol=1)


def test_merscope_middle_dapi_plane_is_placed_by_the_inverse_mosaic_transform(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for z in range(3):
        tifffile.imwrite(images / f"mosaic_DAPI_z{z}.tif", np.full((600, 900), z, np.uint16))
    (images / "micron_to_mosaic_pixel_transform.csv").write_text(
        "9.2 0 100\n0 9.2 50\n0 0 1\n"
    )
    got = platform_image(section("merscope", tmp_path), max_side=300)
    assert got.path.name == "mosaic_DAPI_z1.tif" and got.image.shape == (200, 300)
    assert (got.image == 1).all()
    mosaic_to_um = np.linalg.inv(np.array([[9.2, 0, 100], [0, 9.2, 50], [0, 0, 1]]))
    np.testing.assert_allclose(got.image_to_native, mosaic_to_um @ np.diag([3.0, 3.0, 1.0]))


def test_visium_hires_png_is_placed_by_its_scale_factor(tmp_path: Path) -> None:
    from PIL import Image

    spatial = tmp_path / "spatial"
    spatial.mkdir()
    scalefactors = spatial / "scalefactors_json.json"
    scalefactors.write_text(json.dumps({"tissue_hires_scalef": 0.25,
                                        "tissue_lowres_scalef": 0.075}))
    Image.fromarray(np.zeros((400, 500, 3), np.uint8)).save(spatial / "tissue_lowres_image.png")
    got = platform_image(section("visium", tmp_path, (str(scalefactors),)))
    assert got.path.name == "tissue_lowres_image.png" and got.modality == "he"  # no hires
    np.testing.assert_allclose(got.image_to_native, np.diag([1 / 0.075, 1 / 0.075, 1.0]))
    (spatial / "tissue_lowres_image.png").unlink()
    with pytest.raises(BundleError, match=r"neither tissue_hires_image.png nor"):
        platform_image(section("visium", tmp_path, (str(scalefactors),)))


def test_platforms_without_a_placeable_image_name_the_landmarks(tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match=r"cosmx bundles keep none.*--landmarks"):
        platform_image(section("cosmx", tmp_path))
