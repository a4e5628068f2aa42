"""A section as a SpatialData zarr store: H&E, true unit geometry, counts, frames.

Format: https://spatialdata.scverse.org/en/stable/ (elements, models and transformations).

Elements (``<id>`` is the section id):

- ``images['<id>_image']``: RGB, multiscale (halving until the coarsest level is under 512 px);
  the WSI downsampled to ``image_mpp`` when the caller gives the WSI, else a mosaic of the stored
  patches. A copy, not a reference: a corpus keeps no WSI path, and the store must open alone.
- ``shapes['<id>_units']``: circles (``radius`` = half the spot diameter) or squares (polygons)
  at the units' centres, in WSI level-0 px; index 0..n-1.
- ``shapes['<id>_patches']``: the patch footprints (squares), index = pair number.
- ``tables['table']``: raw counts (units x panel), annotating ``<id>_units`` through
  ``obs['region']`` / ``obs['instance_id']`` (TableModel's region_key / instance_key).

Coordinate systems, as the spatialdata transformations docs define them: ``wsi_px`` (WSI level-0
px; identity for the shapes, a Scale by the downsample for the image), ``um`` (micrometres: a
Scale by the mpp) and ``native`` (the platform's own frame: the inverse of ``native_to_wsi``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Affine, BaseTransformation, Identity, Scale, Sequence

from histmol.export.table import section_table
from histmol.qc.section_data import Background, StoredSection

COARSEST_SIDE = 512
CHUNK_PX = 1024


def frames(
    section: StoredSection, scale_x: float = 1.0, scale_y: float = 1.0
) -> dict[str, BaseTransformation]:
    """Map an element whose px span `scale_x` x `scale_y` level-0 px to each frame."""
    to_wsi: BaseTransformation = (
        Identity() if scale_x == scale_y == 1.0 else Scale([scale_x, scale_y], axes=("x", "y"))
    )
    to_native = Affine(
        np.linalg.inv(section.native_to_wsi), input_axes=("x", "y"), output_axes=("x", "y")
    )
    mpp = section.mpp
    return {
        "wsi_px": to_wsi,
        "um": Scale([scale_x * mpp, scale_y * mpp], axes=("x", "y")),
        "native": Sequence([to_wsi, to_native]),
    }


def _scale_factors(height: int, width: int) -> list[int]:
    factors, side = [], max(height, width)
    while side / 2 >= COARSEST_SIDE:
        factors.append(2)
        side /= 2
    return factors


def _squares(x: np.ndarray, y: np.ndarray, side: float, *, centred: bool) -> np.ndarray:
    half = side / 2 if centred else 0.0
    return shapely.box(x - half, y - half, x - half + side, y - half + side)


def section_spatialdata(
    section: StoredSection, genes: pd.DataFrame, background: Background
) -> SpatialData:
    """Build the section as an in-memory SpatialData object (see the module docstring)."""
    sid = section.section_id
    image = np.ascontiguousarray(background.image.transpose(2, 0, 1))
    factors = _scale_factors(*image.shape[1:])
    images = {
        f"{sid}_image": Image2DModel.parse(
            image,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=factors or None,
            chunks=(3, CHUNK_PX, CHUNK_PX),
            transformations=frames(section, background.downsample_x, background.downsample_y),
        )
    }
    x = section.units["x_wsi_px"].to_numpy(np.float64)
    y = section.units["y_wsi_px"].to_numpy(np.float64)
    index = pd.RangeIndex(len(x))
    if section.row["unit_shape"] == "circle":
        units = ShapesModel.parse(
            np.column_stack([x, y]),
            geometry=0,
            radius=np.full(len(x), section.unit_size_px / 2),
            index=index,
            transformations=frames(section),
        )
    else:
        geometry = _squares(x, y, section.unit_size_px, centred=True)
        units = ShapesModel.parse(
            gpd.GeoDataFrame(geometry=geometry, index=index), transformations=frames(section)
        )
    pairs = section.pairs()
    patches = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"part": pairs["part"].to_numpy(), "pair_index": pairs["pair_index"].to_numpy()},
            geometry=_squares(
                pairs["x0"].to_numpy(), pairs["y0"].to_numpy(), section.footprint_px, centred=False
            ),
            index=pd.Index(pairs["pair"].to_numpy()),
        ),
        transformations=frames(section),
    )
    table = section_table(section, genes)
    region = f"{sid}_units"
    table.obs["region"] = pd.Categorical([region] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region=region, region_key="region", instance_key="instance_id")
    return SpatialData(
        images=images, shapes={region: units, f"{sid}_patches": patches}, tables={"table": table}
    )


def write_spatialdata(sdata: SpatialData, out: str | os.PathLike[str]) -> Path:
    """Write `sdata` as a zarr store at `out` (which must not exist)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # anndata announces a future zarr default once per array
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata.write(out)
    return out
