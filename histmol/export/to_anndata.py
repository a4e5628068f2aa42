"""A section as an .h5ad that scanpy and squidpy plot on its H&E without further work.

Follows the layout scanpy's Visium reader builds (scanpy.read_visium; documented with
`scanpy.pl.spatial`, https://scanpy.readthedocs.io/en/stable/generated/scanpy.pl.spatial.html):
``obsm['spatial']`` holds unit centres in full-resolution pixels, here WSI level-0 px (x, y),
and ``uns['spatial'][library_id]`` holds ``images['hires']`` (an RGB picture of the slide) with
``scalefactors['tissue_hires_scalef']`` (image px per level-0 px) and
``scalefactors['spot_diameter_fullres']`` (the unit diameter, or square side, in level-0 px).
``library_id`` is the section id. The picture is the WSI downsampled when the caller passes it,
else a mosaic of the stored patches (``uns['spatial'][id]['metadata']['image_source']`` says which).
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from histmol.export.table import section_table
from histmol.qc.section_data import Background, StoredSection

HIRES_SIDE = 2000  # Space Ranger's tissue_hires_image.png is 2000 px on its longer side


def section_anndata(
    section: StoredSection, genes: pd.DataFrame, background: Background
) -> anndata.AnnData:
    """Build the section's table with ``obsm['spatial']`` and scanpy's ``uns['spatial']``."""
    table = section_table(section, genes)
    table.obsm["spatial"] = section.units[["x_wsi_px", "y_wsi_px"]].to_numpy(np.float64)
    table.uns["spatial"] = {
        section.section_id: {
            "images": {"hires": background.image},
            "scalefactors": {
                "tissue_hires_scalef": 1.0 / background.downsample_x,
                "spot_diameter_fullres": section.unit_size_px,
            },
            "metadata": {
                "image_source": background.source,
                "source_image": str(section.row["wsi_name"]),
                "microns_per_pixel": section.mpp,
                "unit_shape": str(section.row["unit_shape"]),
            },
        }
    }
    return table


def write_anndata(table: anndata.AnnData, out: str | os.PathLike[str]) -> Path:
    """Write `table` as .h5ad (gzip-compressed X)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_h5ad(out, compression="gzip")
    return out
