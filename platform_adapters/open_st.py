"""Open-ST adapter: a spacemake/openst h5ad aligned to its H&E, binned to squares.

Reads the single h5ad that `openst pairwise_aligner` (or `manual_pairwise_aligner`) writes
(rajewsky-lab/openst: docs `computational/pairwise_alignment.md`, `openst/alignment/
pairwise_aligner.py`, `transcript_assign.py`, `utils/pseudoimage.py`):

- rows: the barcoded capture spots (~0.6 um) of all tiles of a sample (spacemake's
  `puck_collection`), with `obs/tile_id` / `obs/puck_id`; columns: genes (spacemake gene names;
  `var/gene_ids` or `var/gene_id` when present).
- counts: `layers/counts` when present (a normalised `X` keeps its raw counts there), else `X`;
  CSR (read by row chunks) or dense; raw integers stored as int or float.
- `obsm/spatial`: spot positions in micrometres (openst's `pseudoimage --input-resolution`
  default: "in microns, leave as 1").
- `obsm/spatial_pairwise_aligned_fine` (per-tile fine alignment), else
  `obsm/spatial_pairwise_aligned_coarse` (`--only-coarse`): positions in the pixels of the
  aligned staining image, stored as (row, col): `transcript_assign` indexes the segmentation mask
  with `mask[spatial[:, 0], spatial[:, 1]]`.
- `uns/spatial_pairwise_aligned/staining_image_transformed` (with `--save-image-in-h5`): that
  image, the input H&E flipped/rotated as the aligner chose. Spots outside it are dropped and
  counted; when too many fall outside, and the columns read as (x, y) would fit, the file is
  refused as swapped.

Units: square bins of `bin_um` (default 8 um) on the aligned image's pixel frame (x = col,
y = row), from its origin; the spots are far below a patch's resolution, and spacemake's
hexagonal meshes are a different, coarser unit we do not reuse. Bin sides in pixels need the
image's pixel size: `um_per_px`, else the WSI's embedded mpp, else the scale of the fit
`obsm/spatial` (um) -> aligned pixels (recorded in QC in every case). Native frame: aligned
image pixels, so `wsi` must be that image (no transform needed). The h5ad is read with h5py and
`anndata.io.read_elem` rather than `anndata.read_h5ad`: the staining image in `uns` can be
gigabytes, and counts are streamed by row chunks into the bins.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from histmol.binning import BinAccumulator, BinnedCounts
from histmol.errors import BundleError, RegistrationError, WSIError
from histmol.landmarks import fit_affine
from histmol.section import Section
from platform_adapters._binned import binned_units, check_bin_um, image_um_per_px
from platform_adapters._common import (
    as_int32_counts,
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    panel_section,
)

PLATFORM = "open-st"
ADAPTER_VERSION = "1"

DEFAULT_BIN_UM = 8.0
ROW_CHUNK = 200_000  # spots read at a time
FIT_SAMPLE = 20_000  # spots used to measure the um -> px scale of the alignment


class OpenSTKeys(StrEnum):
    """Paths inside an Open-ST h5ad."""

    FINE = "spatial_pairwise_aligned_fine"
    COARSE = "spatial_pairwise_aligned_coarse"
    SPATIAL_UM = "spatial"
    OBSM = "obsm"
    VAR = "var"
    X = "X"
    COUNTS_LAYER = "layers/counts"
    IMAGE = "uns/spatial_pairwise_aligned/staining_image_transformed"
    IMAGE_INPUT = "uns/spatial_pairwise_aligned/staining_image"


GENE_ID_COLUMNS = ("gene_ids", "gene_id")
ALIGNED_KEYS = (OpenSTKeys.FINE, OpenSTKeys.COARSE)


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    h5ad: str | os.PathLike[str] | None = None,
    spatial_key: str | None = None,
    bin_um: float = DEFAULT_BIN_UM,
    um_per_px: float | None = None,
) -> Section:
    """Read an aligned Open-ST h5ad into a Section of `bin_um` square bins in image pixels.

    Args:
        bundle: folder holding one aligned `*.h5ad` (or pass `h5ad=`).
        wsi: the aligned staining image (`staining_image_transformed`) as a slide file; opened
            only for its pixel size when `um_per_px` is not given.
        section_id: defaults to the slug of the bundle folder name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of spots that must lie inside the aligned image.
        native_to_wsi: explicit 3x3 affine, aligned image pixels -> WSI level-0 pixels.
        h5ad: the h5ad, overriding autodetection.
        spatial_key: the `obsm` key of the aligned positions (default: fine, else coarse).
        bin_um: bin side in micrometres.
        um_per_px: the image's micrometres per pixel (default: embedded mpp, else the scale of
            the alignment).

    Raises:
        BundleError: a missing, ambiguous or malformed file, an unaligned h5ad, non-integer
            counts, or too many spots outside the aligned image.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    bin_um = check_bin_um(bin_um)
    folder = bundle_folder(bundle)
    path = explicit_file(h5ad, "h5ad") if h5ad else _find_h5ad(folder)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise BundleError(path, f"cannot open as HDF5 (truncated or not an h5ad): {err}") from err
    with handle:
        data = _Contents.load(path, handle, spatial_key)
        scale, source = _pixel_size(wsi, um_per_px, data.alignment_um_per_px)
        inside = data.inside_image(path, min_match_rate)
        binned = _bin(path, handle, data, inside, bin_um, scale)
    if binned.n_bins == 0:
        raise BundleError(path, "holds no counts for spots inside the aligned image")
    panel = build_gene_panel(data.gene_ids, data.gene_names, binned.counts)
    qc: dict[str, float | int | str | bool] = {
        "spatial_key": data.spatial_key,
        "counts_source": data.matrix_key,
        "n_spots": data.n_spots,
        "n_spots_outside_image": int((~inside).sum()),
        "um_per_px": scale,
        "um_per_px_source": source,
        "n_bins": binned.n_bins,
        "bin_um": bin_um,
        "n_control_probes": panel.n_controls,
    }
    if data.alignment_um_per_px is not None:
        qc["um_per_px_from_alignment"] = data.alignment_um_per_px
    if data.image_shape is not None:
        qc["aligned_image_height"], qc["aligned_image_width"] = data.image_shape
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=binned_units(binned, scale),
        panel=panel,
        files=(path,),
        layout=f"openst_{data.spatial_key}",
        metadata=metadata,
        unit_shape="square",
        unit_size_um=bin_um,
        pitch_um=bin_um,
        default_mode="grid",
        native_to_wsi=explicit,
        native_um_per_unit=scale,
        qc=qc,
    )


def _find_h5ad(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("*.h5ad") if p.is_file())
    if len(found) != 1:
        what = "no *.h5ad" if not found else f"several h5ad files {[p.name for p in found]}"
        raise BundleError(
            folder, f"{what}; an Open-ST bundle holds one aligned h5ad (or pass h5ad=)"
        )
    return found[0]


@dataclass(frozen=True)
class _Contents:
    """What is read up front: aligned positions (x = col, y = row), genes, the matrix key."""

    spatial_key: str
    x_px: np.ndarray
    y_px: np.ndarray
    gene_ids: np.ndarray
    gene_names: np.ndarray
    matrix_key: str
    image_shape: tuple[int, int] | None
    alignment_um_per_px: float | None

    @property
    def n_spots(self) -> int:
        """Number of capture spots (h5ad rows)."""
        return len(self.x_px)

    @classmethod
    def load(cls, path: Path, handle: h5py.File, spatial_key: str | None) -> _Contents:
        obsm = handle.get(OpenSTKeys.OBSM)
        found = sorted(obsm.keys()) if isinstance(obsm, h5py.Group) else []
        wanted = [spatial_key] if spatial_key else [k.value for k in ALIGNED_KEYS]
        key = next((k for k in wanted if k in found), None)
        if key is None:
            raise BundleError(
                path,
                f"no aligned positions: obsm lacks {wanted} (found {found}); run openst "
                "pairwise_aligner (or pass spatial_key=)",
            )
        try:
            rows_cols = np.asarray(read_elem(obsm[key]), dtype=np.float64)
            var = read_elem(handle[OpenSTKeys.VAR])
        except (KeyError, OSError, ValueError, TypeError) as err:
            raise BundleError(path, f"cannot read obsm/{key} or var: {err}") from err
        if rows_cols.ndim != 2 or rows_cols.shape[1] != 2 or not np.isfinite(rows_cols).all():
            raise BundleError(
                path, f"obsm/{key} must be a finite (n_spots, 2) array, got shape {rows_cols.shape}"
            )
        names = var.index.astype(str).to_numpy(object)
        id_column = next((c for c in GENE_ID_COLUMNS if c in var.columns), None)
        ids = var[id_column].astype(str).to_numpy(object) if id_column else names
        layer, dense = OpenSTKeys.COUNTS_LAYER.value, OpenSTKeys.X.value
        matrix_key = layer if layer in handle else dense
        if matrix_key not in handle:
            raise BundleError(path, "holds no count matrix (neither X nor layers/counts)")
        image = handle.get(OpenSTKeys.IMAGE)
        if image is None:
            image = handle.get(OpenSTKeys.IMAGE_INPUT)
        shape = (int(image.shape[0]), int(image.shape[1])) if image is not None else None
        x_px, y_px = rows_cols[:, 1], rows_cols[:, 0]
        return cls(
            key,
            x_px,
            y_px,
            ids,
            names,
            matrix_key,
            shape,
            _alignment_scale(path, obsm, found, x_px, y_px),
        )

    def inside_image(self, path: Path, min_match_rate: float) -> np.ndarray:
        """Spots inside the aligned image (all of them when the h5ad holds no image)."""
        if self.image_shape is None:
            return np.ones(self.n_spots, dtype=bool)
        height, width = self.image_shape
        inside = (self.x_px >= 0) & (self.y_px >= 0) & (self.x_px < width) & (self.y_px < height)
        if inside.mean() >= min_match_rate:
            return inside
        swapped = (self.y_px >= 0) & (self.x_px >= 0) & (self.y_px < width) & (self.x_px < height)
        hint = (
            " Read as (x, y) they would fit: the columns look swapped; Open-ST stores (row, col)."
            if swapped.mean() >= min_match_rate
            else ""
        )
        raise BundleError(
            path,
            f"only {inside.mean():.2%} of the spots of obsm/{self.spatial_key} lie inside the "
            f"{width} x {height} px aligned image (min_match_rate {min_match_rate:.2%}).{hint}",
        )


def _alignment_scale(
    path: Path, obsm: h5py.Group, found: list[str], x_px: np.ndarray, y_px: np.ndarray
) -> float | None:
    """Um per aligned pixel implied by the fit obsm/spatial (um) -> aligned positions."""
    if OpenSTKeys.SPATIAL_UM not in found:
        return None
    um = np.asarray(read_elem(obsm[OpenSTKeys.SPATIAL_UM]), dtype=np.float64)
    if um.shape != (len(x_px), 2):
        raise BundleError(path, f"obsm/spatial has shape {um.shape}, expected ({len(x_px)}, 2)")
    step = max(1, len(x_px) // FIT_SAMPLE)
    try:
        fit = fit_affine(um[::step], np.column_stack([x_px, y_px])[::step], allow_mirror=True)
    except RegistrationError:
        return None
    return float(1.0 / np.sqrt(abs(fit.determinant)))


def _pixel_size(
    wsi: str | os.PathLike[str], um_per_px: float | None, from_alignment: float | None
) -> tuple[float, str]:
    """Pick the user's value, else the WSI's embedded mpp, else the alignment's scale."""
    try:
        return image_um_per_px(wsi, um_per_px)
    except WSIError:
        if from_alignment is None:
            raise
        return from_alignment, "alignment"


def _row_chunks(
    path: Path, handle: h5py.File, key: str, n_rows: int
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR block) over the count matrix, checked as raw integers."""
    element = handle[key]
    encoding = element.attrs.get("encoding-type", "")
    try:
        if isinstance(element, h5py.Dataset):
            source = element
        elif encoding == "csr_matrix":
            source = sparse_dataset(element)
        elif encoding == "csc_matrix":  # column-major: one read, then row slices in memory
            source = sp.csr_matrix(sparse_dataset(element).to_memory())
        else:
            raise BundleError(path, f"{key} has an unsupported encoding {encoding!r}")
        if source.shape[0] != n_rows:
            raise BundleError(
                path, f"{key} has {source.shape[0]} rows but the aligned positions {n_rows}"
            )
        for start in range(0, n_rows, ROW_CHUNK):
            yield start, as_int32_counts(source[start : start + ROW_CHUNK], path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BundleError(path, f"cannot read the counts in {key}: {err}") from err


def _bin(
    path: Path,
    handle: h5py.File,
    data: _Contents,
    inside: np.ndarray,
    bin_um: float,
    um_per_px: float,
) -> BinnedCounts:
    """Stream counts of the spots inside the image into bins of `bin_um`."""
    accumulator = BinAccumulator(max(len(data.gene_names), 1), bin_um)
    for start, block in _row_chunks(path, handle, data.matrix_key, data.n_spots):
        if block.shape[1] != len(data.gene_names):
            raise BundleError(
                path,
                f"{data.matrix_key} has {block.shape[1]} columns but var "
                f"lists {len(data.gene_names)} genes",
            )
        coo = block.tocoo()
        rows = coo.row + start
        keep = inside[rows]
        rows = rows[keep]
        accumulator.add_points(
            data.x_px[rows] * um_per_px, data.y_px[rows] * um_per_px, coo.col[keep], coo.data[keep]
        )
    return accumulator.result()
