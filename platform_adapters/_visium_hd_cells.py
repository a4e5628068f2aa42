"""Visium HD segmented cells (Space Ranger >= 4.0 `segmented_outputs/`) as expression units.

Files (Space Ranger "Segmented outputs" docs; scverse/spatialdata-io `readers/visium_hd.py`,
`_extract_geometries_from_geojson`): `filtered_feature_cell_matrix.h5` (10x HDF5, barcodes
`cellid_{cell_id:09d}-1`), `cell_segmentations.geojson` (a FeatureCollection; each feature a
Polygon, or MultiPolygon, in full-resolution px with an integer `properties.cell_id`) and
`spatial/scalefactors_json.json` (microns_per_pixel). A cell's centre is the area centroid of
its polygon (not the mean of its vertices, which follows the vertex density).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histmol.errors import BundleError
from platform_adapters._common import GenePanel, build_gene_panel, inner_join_ids
from platform_adapters._tenx import GENE_EXPRESSION, read_10x_h5, read_scalefactors

CELL_MATRIX = "filtered_feature_cell_matrix.h5"
CELL_POLYGONS = "cell_segmentations.geojson"
SCALEFACTORS = "spatial/scalefactors_json.json"
MICRONS_PER_PIXEL = "microns_per_pixel"


@dataclass(frozen=True)
class Cells:
    """Matched cells (matrix order), their counts and what a Section needs besides."""

    folder: Path
    units: pd.DataFrame
    panel: GenePanel
    qc: dict[str, float | int | str | bool]
    files: tuple[Path, ...]
    unit_size_um: float
    microns_per_pixel: float
    scalefactors: dict[str, float]


def polygon_centroid(ring: np.ndarray) -> tuple[float, float, float]:
    """(area, x, y) of a closed or open ring by the shoelace formula (area unsigned)."""
    x, y = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2.0
    if area == 0:
        return 0.0, float(x.mean()), float(y.mean())
    return (
        abs(area),
        float(((x + x1) * cross).sum() / (6 * area)),
        float(((y + y1) * cross).sum() / (6 * area)),
    )


def _cell_geometry(path: Path) -> pd.DataFrame:
    """cell_id, barcode, centroid (px) and area (px^2) of every polygon in the GeoJSON."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise BundleError(path, f"cannot read as GeoJSON (truncated?): {err}") from err
    if not isinstance(raw, dict) or raw.get("type") != "FeatureCollection":
        raise BundleError(path, "expected a GeoJSON FeatureCollection")
    rows = []
    for k, feature in enumerate(raw.get("features", [])):
        try:
            cell_id = int(feature["properties"]["cell_id"])
            geometry = feature["geometry"]
            parts = {
                "Polygon": [geometry["coordinates"]],
                "MultiPolygon": geometry["coordinates"],
            }[geometry["type"]]
            pieces = [polygon_centroid(np.asarray(part[0], np.float64)[:, :2]) for part in parts]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise BundleError(
                path, f"feature {k} is not a cell polygon with properties.cell_id: {err!r}"
            ) from err
        area = sum(p[0] for p in pieces)
        if not area > 0:
            raise BundleError(path, f"cell {cell_id} has a polygon of zero area")
        x = sum(p[0] * p[1] for p in pieces) / area
        y = sum(p[0] * p[2] for p in pieces) / area
        rows.append((cell_id, f"cellid_{cell_id:09d}-1", x, y, area))
    if not rows:
        raise BundleError(path, "holds no cell polygons")
    return pd.DataFrame(rows, columns=["cell_id", "barcode", "x", "y", "area_px2"])


def read_cells(folder: Path, *, min_match_rate: float) -> Cells:
    """Read segmented cells from a `segmented_outputs/` folder."""
    if not folder.is_dir():
        raise BundleError(
            folder, "missing: units='cells' needs Space Ranger >= 4.0 segmented outputs"
        )
    matrix_file, polygons_file, scalefactors_file = (
        folder / CELL_MATRIX,
        folder / CELL_POLYGONS,
        folder / SCALEFACTORS,
    )
    for path in (matrix_file, polygons_file, scalefactors_file):
        if not path.exists():
            raise BundleError(path, "missing from the segmented outputs")
    scalefactors = read_scalefactors(scalefactors_file)
    mpp = scalefactors.get(MICRONS_PER_PIXEL, 0.0)
    if not mpp > 0:
        raise BundleError(scalefactors_file, f"lacks a positive {MICRONS_PER_PIXEL}")
    cells = _cell_geometry(polygons_file)
    matrix = read_10x_h5(matrix_file)
    n_features = len(matrix.feature_ids)
    matrix = matrix.only_feature_type(GENE_EXPRESSION)
    join = inner_join_ids(
        matrix.barcodes,
        cells["barcode"].to_numpy(),
        matrix_file=matrix_file,
        positions_file=polygons_file,
        min_match_rate=min_match_rate,
        what="cell barcodes",
    )
    placed = cells.iloc[join.positions_index].reset_index(drop=True)
    panel = build_gene_panel(
        matrix.feature_ids, matrix.feature_names, matrix.counts[join.matrix_index]
    )
    area_um2 = placed["area_px2"].to_numpy() * mpp**2
    units = pd.DataFrame(
        {
            "unit_id": matrix.barcodes[join.matrix_index].astype(object),
            "x_native": placed["x"].to_numpy(np.float64),
            "y_native": placed["y"].to_numpy(np.float64),
            "cell_id": placed["cell_id"].to_numpy(np.int64),
            "area_um2": area_um2,
        }
    )
    diameter = float(np.median(2.0 * np.sqrt(area_um2 / np.pi)))
    qc: dict[str, float | int | str | bool] = {
        f"scalefactor_{k}": v for k, v in scalefactors.items()
    }
    qc.update(
        n_matrix_barcodes=join.n_matrix,
        n_matched_barcodes=join.n_matched,
        barcode_match_rate=join.match_rate,
        n_cell_polygons=len(cells),
        n_features_not_gene_expression=n_features - len(matrix.feature_ids),
        n_control_probes=panel.n_controls,
        median_cell_area_um2=float(np.median(area_um2)),
        cell_diameter_um=diameter,
    )
    return Cells(
        folder,
        units,
        panel,
        qc,
        (polygons_file, scalefactors_file, matrix_file),
        diameter,
        mpp,
        scalefactors,
    )
