"""Slide-seq / Slide-seqV2 and Curio Seeker adapter: 10 um barcoded beads.

Reads one of two layouts from the bundle folder:

- `spacexr` (Slide-seqV2 as distributed for RCTD/spacexr, dmcable/spacexr `read.SpatialRNA`):
  `*BeadLocationsForR.csv` (columns `barcodes, xcoord, ycoord`) and `*MappedDGEForR.csv`
  (genes x beads: first column the gene, header row the bead barcodes; raw counts). The
  Drop-seq tools DGE `*.digital_expression.txt[.gz]` (tab-separated, first column `GENE`) is
  read the same way. A DGE written beads x genes is recognised by where the barcodes are.
- `curio` (Curio Seeker pipeline): `*_anndata.h5ad` with raw counts in `layers["counts"]` or
  `X` (beads x genes) and bead positions in `obsm["spatial"]` (`obsm["X_spatial"]` in older
  outputs); see scverse/spatialdata-io `readers/curio.py`.

Native frame: micrometres, x = `xcoord` (column), y = `ycoord`, scaled by `um_per_coordinate`.
Slide-seq pucks are imaged at 0.65 um per pixel and BeadLocations are in those pixels
(Rodriques et al. 2019, Stickels et al. 2021; the factor CellChat's FAQ quotes for Slide-seq
is 1/0.65 = 1.54 px/um); Curio Seeker positions are taken to be micrometres already. Both are
options because pucks imaged on other set-ups differ.

Beads are randomly packed, so no lattice pitch is claimed (`pitch_um=None`): the pitch estimate
would vary with packing and with beads dropped by the pipeline, and a wrong pitch would fail the
mpp cross-check. The image's mpp comes from the WSI or from the transform's scale (the native
frame is in micrometres). The H&E of a Slide-seq puck is almost always an adjacent section, so
`metadata["adjacent_section"]` is set to "true" unless `adjacent_section=False`; no bundle
carries a transform to the H&E, so `native_to_wsi` is None unless given (or fitted from
landmarks by the build stage).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.errors import BundleError, ConfigError
from histmol.registration import median_neighbour_distance
from histmol.section import Section
from platform_adapters._common import (
    EXAMPLES,
    as_int32_counts,
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    inner_join_ids,
    metadata_dict,
    panel_section,
    require_columns,
)
from platform_adapters._csv_tables import read_dense_counts

PLATFORM = "slide-seq"
ADAPTER_VERSION = "1"
BEAD_DIAMETER_UM = 10.0
SLIDESEQ_UM_PER_PIXEL = 0.65  # Slide-seq(V2) puck images, the unit of BeadLocations
CURIO_UM_PER_UNIT = 1.0  # Curio Seeker obsm["spatial"]


class SlideSeqFiles(StrEnum):
    """File name patterns, relative to the bundle folder."""

    BEAD_LOCATIONS = "*BeadLocationsForR.csv"
    BEAD_LOCATIONS_GZ = "*BeadLocationsForR.csv.gz"
    DGE = "*MappedDGEForR.csv"
    DGE_GZ = "*MappedDGEForR.csv.gz"
    DIGITAL_EXPRESSION = "*.digital_expression.txt"
    DIGITAL_EXPRESSION_GZ = "*.digital_expression.txt.gz"
    CURIO_ANNDATA = "*_anndata.h5ad"


class SlideSeqKeys(StrEnum):
    """Column and AnnData keys."""

    BARCODES = "barcodes"
    XCOORD = "xcoord"
    YCOORD = "ycoord"
    SPATIAL = "spatial"
    X_SPATIAL = "X_spatial"  # older Curio outputs
    COUNTS_LAYER = "counts"
    GENE_IDS = "gene_ids"


POSITION_PATTERNS = (SlideSeqFiles.BEAD_LOCATIONS, SlideSeqFiles.BEAD_LOCATIONS_GZ)
DGE_PATTERNS = (
    SlideSeqFiles.DGE,
    SlideSeqFiles.DGE_GZ,
    SlideSeqFiles.DIGITAL_EXPRESSION,
    SlideSeqFiles.DIGITAL_EXPRESSION_GZ,
)
QC = dict[str, float | int | str | bool]


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    counts: str | os.PathLike[str] | None = None,
    positions: str | os.PathLike[str] | None = None,
    um_per_coordinate: float | None = None,
    adjacent_section: bool = True,
) -> Section:
    """Read a Slide-seq (spacexr CSVs) or Curio Seeker (h5ad) bundle into a Section in um.

    Args:
        bundle: the folder holding the bead locations and the DGE, or a Curio `*_anndata.h5ad`.
        wsi: the H&E image (usually of an adjacent section; not opened here).
        section_id: defaults to the slug of the bundle folder's name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of DGE beads that must have a location.
        native_to_wsi: explicit 3x3 affine, micrometres -> WSI level-0 pixels.
        counts: override the DGE (csv / txt[.gz]) or the Curio `.h5ad`.
        positions: override the bead locations CSV.
        um_per_coordinate: micrometres per bead coordinate unit; default 0.65 (Slide-seq puck
            pixels) for bead-location CSVs and 1.0 for Curio h5ad files.
        adjacent_section: record the H&E as an adjacent section (the usual Slide-seq case) in
            `metadata["adjacent_section"]`, unless the caller's metadata already says.

    Raises:
        BundleError: a missing, ambiguous or malformed file, or a bead match rate under the
            threshold.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    folder = bundle_folder(bundle)
    counts_file, positions_file = _find_files(folder, counts, positions)
    qc: QC = {}
    if positions_file is None:
        layout = "curio"
        scale = _scale(um_per_coordinate, CURIO_UM_PER_UNIT)
        barcodes, xy, ids, names, matrix = _read_curio(counts_file, qc)
        files = [counts_file]
    else:
        layout = "spacexr"
        scale = _scale(um_per_coordinate, SLIDESEQ_UM_PER_PIXEL)
        barcodes, xy, names, matrix = _join_beads(counts_file, positions_file, min_match_rate, qc)
        ids = names
        files = [positions_file, counts_file]
    panel = build_gene_panel(ids, names, matrix)
    units = pd.DataFrame(
        {
            "unit_id": np.asarray(barcodes, dtype=object),
            "x_native": xy[:, 0] * scale,
            "y_native": xy[:, 1] * scale,
            "x_coordinate": xy[:, 0],
            "y_coordinate": xy[:, 1],
        }
    )
    spacing = median_neighbour_distance(units["x_native"].to_numpy(), units["y_native"].to_numpy())
    qc.update(
        layout=layout,
        um_per_coordinate=scale,
        n_control_probes=panel.n_controls,
        n_beads=len(units),
        median_bead_spacing_um=float(spacing) if spacing else 0.0,
    )
    meta = metadata_dict(metadata)
    if adjacent_section:
        meta.setdefault("adjacent_section", "true")
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=units,
        panel=panel,
        files=files,
        layout=layout,
        metadata=meta,
        unit_shape="circle",
        unit_size_um=BEAD_DIAMETER_UM,
        pitch_um=None,
        default_mode="grid",
        native_to_wsi=explicit,
        native_um_per_unit=1.0,
        qc=qc,
    )


def _join_beads(
    counts_file: Path, positions_file: Path, min_match_rate: float, qc: QC
) -> tuple[np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
    """(barcodes, xy, gene names, beads x genes counts) of the DGE beads that have a location."""
    beads = _read_bead_locations(positions_file)
    known = beads[SlideSeqKeys.BARCODES].to_numpy()
    dge_barcodes, names, matrix = _read_dge(counts_file, set(known), qc)
    join = inner_join_ids(
        dge_barcodes,
        known,
        matrix_file=counts_file,
        positions_file=positions_file,
        min_match_rate=min_match_rate,
        what="bead barcodes",
    )
    placed = beads.iloc[join.positions_index]
    xy = placed[[SlideSeqKeys.XCOORD, SlideSeqKeys.YCOORD]].to_numpy(np.float64)
    qc.update(
        n_dge_beads=join.n_matrix,
        n_matched_beads=join.n_matched,
        bead_match_rate=join.match_rate,
        n_location_beads=len(beads),
    )
    return dge_barcodes[join.matrix_index], xy, names, sp.csr_matrix(matrix[join.matrix_index])


def _scale(value: float | None, default: float) -> float:
    scale = default if value is None else float(value)
    if not (np.isfinite(scale) and scale > 0):
        raise ConfigError(f"um_per_coordinate must be a positive number, got {value!r}")
    return scale


def _glob(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(str(pattern)) if p.is_file()})


def _one(folder: Path, patterns: tuple[str, ...], what: str, option: str) -> Path | None:
    found = _glob(folder, patterns)
    if len(found) > 1:
        raise BundleError(
            folder, f"several {what} files {[p.name for p in found]}; pass {option}= to choose"
        )
    return found[0] if found else None


def _find_files(
    folder: Path,
    counts: str | os.PathLike[str] | None,
    positions: str | os.PathLike[str] | None,
) -> tuple[Path, Path | None]:
    """Find the counts file and the bead locations (None for a Curio h5ad)."""
    if counts is not None:
        counts_file = explicit_file(counts, "counts file")
    else:
        dge = _one(folder, DGE_PATTERNS, "DGE", "counts")
        curio = _one(folder, (SlideSeqFiles.CURIO_ANNDATA,), "Curio AnnData", "counts")
        if dge is not None and curio is not None:
            raise BundleError(
                folder,
                f"both a Slide-seq DGE ({dge.name}) and a Curio AnnData ({curio.name}); pass "
                "counts= to choose",
            )
        found = dge or curio
        if found is None:
            looked = ", ".join([*DGE_PATTERNS, SlideSeqFiles.CURIO_ANNDATA])
            raise BundleError(folder, f"no bead counts found; looked for {looked}")
        counts_file = found
    if counts_file.suffix == ".h5ad":
        return counts_file, None
    if positions is not None:
        return counts_file, explicit_file(positions, "bead locations file")
    located = _one(folder, POSITION_PATTERNS, "bead locations", "positions")
    if located is None:
        raise BundleError(
            folder,
            f"no bead locations for {counts_file.name}; looked for "
            f"{', '.join(POSITION_PATTERNS)} (barcodes, xcoord, ycoord)",
        )
    return counts_file, located


def _read_bead_locations(path: Path) -> pd.DataFrame:
    """Read barcodes (str), xcoord, ycoord (float), checking the coordinates are finite."""
    try:
        frame = pd.read_csv(path, dtype={SlideSeqKeys.BARCODES: str})
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as CSV: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    expected = [SlideSeqKeys.BARCODES, SlideSeqKeys.XCOORD, SlideSeqKeys.YCOORD]
    require_columns(frame, [k.value for k in expected], path, "bead locations table")
    xy = frame[[SlideSeqKeys.XCOORD, SlideSeqKeys.YCOORD]].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(xy.to_numpy(np.float64)).all():
        raise BundleError(path, "xcoord / ycoord hold non-numeric or missing values")
    frame[[SlideSeqKeys.XCOORD, SlideSeqKeys.YCOORD]] = xy
    frame[SlideSeqKeys.BARCODES] = frame[SlideSeqKeys.BARCODES].astype(str).str.strip()
    return frame


def _read_dge(
    path: Path, bead_barcodes: set[str], qc: QC
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """(bead barcodes, gene names, beads x genes counts) of a dense DGE.

    The usual orientation is genes x beads; a DGE written beads x genes (bead barcodes in the
    first column) is recognised by which labels are bead barcodes, and read the same.
    """
    row_ids, labels, matrix = read_dense_counts(path, 1, "DGE")
    rows = np.char.strip(row_ids[:, 0].astype(str)).astype(object)
    labels = np.char.strip(labels.astype(str)).astype(object)
    # set membership: np.isin on object arrays compares every pair (seconds for 40k beads)
    in_rows = sum(value in bead_barcodes for value in rows)
    if in_rows > sum(value in bead_barcodes for value in labels):
        qc["dge_orientation"] = "beads_x_genes"
        return rows, labels, matrix
    qc["dge_orientation"] = "genes_x_beads"
    return labels, rows, sp.csr_matrix(matrix.T)


def _read_curio(
    path: Path, qc: QC
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
    """(barcodes, xy, gene ids, gene names, beads x genes counts) of a Curio Seeker AnnData."""
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(path, f"cannot read as an AnnData h5ad file: {err}") from err
    key = next((k for k in (SlideSeqKeys.SPATIAL, SlideSeqKeys.X_SPATIAL) if k in adata.obsm), None)
    if key is None:
        raise BundleError(
            path,
            f"no bead positions: obsm lacks 'spatial' and 'X_spatial'; found {list(adata.obsm)}",
        )
    xy = np.asarray(adata.obsm[key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise BundleError(path, f"obsm['{key}'] must hold finite (x, y) per bead, got {xy.shape}")
    source = SlideSeqKeys.COUNTS_LAYER if SlideSeqKeys.COUNTS_LAYER in adata.layers else None
    matrix = as_int32_counts(adata.layers[source] if source else adata.X, path)
    barcodes = adata.obs_names.astype(str).to_numpy(object)
    if pd.Index(barcodes).has_duplicates:
        dupes = pd.Index(barcodes)[pd.Index(barcodes).duplicated()][:EXAMPLES].tolist()
        raise BundleError(path, f"duplicate bead barcodes {dupes}")
    names = adata.var_names.astype(str).to_numpy(object)
    ids = (
        adata.var[SlideSeqKeys.GENE_IDS].astype(str).to_numpy(object)
        if SlideSeqKeys.GENE_IDS in adata.var
        else names
    )
    qc.update(
        counts_source=f"layers[{source.value!r}]" if source else "X", positions_source=key.value
    )
    return barcodes, xy[:, :2], ids, names, matrix
