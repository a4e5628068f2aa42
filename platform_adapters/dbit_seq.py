"""DBiT-seq adapter (deterministic barcoding in tissue; Liu et al. 2020, Cell).

Two microfluidic chips flow barcodes A1..An and then, at right angles, B1..Bn over the section
(n = 50 or 100 channels of 10, 25 or 50 um, as wide as the gaps between them: pitch = 2 x
width); each crossing is one square pixel `AxB`. Reads, from one bundle folder:

- counts, one of:
  - the ST Pipeline matrix the DBiT-seq scripts produce (`*_stdata.tsv[.gz]`, or the
    `Filtered_matrix.tsv` of edicliuyang/DBiT-seq_FFPE): pixels as rows named `AxB`, genes as
    columns (read by the legacy ST adapter's parser);
  - an `.h5ad` whose obs names are the 16-nt pixel barcodes, barcode B (8 nt) then barcode A
    (8 nt) as the DBiT-seq `reformat.pl` writes them (`$valueB$valueA`), with the
    `barcode_list*` file mapping them to indices (tab-separated, no header: `A1 AACGTGAT`,
    `B1 ...`): the layout scverse/spatialdata-io `readers/dbit.py` reads.
- `position*.txt` (optional): the on-tissue pixels from `Pixel_identification.m`
  (edicliuyang/DBiT-seq_FFPE): comma-separated `AxB` tokens. With `tissue_only`, other pixels
  are dropped, as `3-expression-under-tissue.pl` (MingyuYang-Yale/DBiT-seq) does.

Orientation: in every script we found, the first index of `AxB` is the image column (x) and
the second the row (y), 1 at the top-left (`Pixel_identification.m` writes `j x i` for column
j, row i; `1-position-matrix.pl` draws x = first index; spatialdata-io puts A first). So the
native frame is x = A, y = B in pixel-index units (`native_um_per_unit` = pitch).

Placing on the image: `native_to_wsi` (`histmol build --transform` passes its file there; with
`--landmarks`, native_x/native_y are A/B indices), else the grid's corner landmarks:
`corners=` or `corners.csv` in the bundle, a CSV
with columns `spot` (`AxB`), `x`, `y` (that pixel's centre in WSI level-0 px), at least three
spots not in a line, usually the four corners. Their least-squares affine fit must not mirror
(a mirror means two corners were swapped, or a lab that writes `BxA`: pass `allow_mirror=True`)
and no corner may lie more than half a channel from where the fit puts it. `corners.csv` holds
pixel CENTRES: centres are 2 channel widths apart, whatever tool found them.

Or `crop_box="x0,y0,x1,y1"`: the rectangle (WSI level-0 px) of the image crop the DBiT lab's
`Pixel_identification.m` (edicliuyang/DBiT-seq_FFPE) works on, cropped "exactly to the size of
the working region": from the outer edge of channel 1 to the outer edge of channel n, so it
spans n channels and n - 1 gaps of equal width, and the script cuts it into 2n - 1 strips
(`pixel_count = 2*pixel-1`), pixel j taking strip 2j - 1. Channel A's centre is therefore at
x0 + (2A - 1.5) W / (2n - 1) (`crop_strips="2n-1"`, the default), not at x0 + (A - 0.5) W / n,
the equal-division rule (`crop_strips="n"`) that holds only for a crop one gap wider (a whole
number of pitches). `n_channels` is n (50, or 100 when an index exceeds 50).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histmol.errors import BundleError, ConfigError, RegistrationError
from histmol.landmarks import fit_affine
from histmol.section import Section
from platform_adapters._common import (
    EXAMPLES,
    as_int32_counts,
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    panel_section,
    require_columns,
)
from platform_adapters.st import _read_counts as read_st_pipeline_counts

PLATFORM = "dbit-seq"
ADAPTER_VERSION = "1"

DEFAULT_CHANNEL_UM = 10.0
MAX_CHANNELS = 100
PIXEL_ID = re.compile(r"^\s*(\d+)x(\d+)\s*$")
BARCODE_LABEL = re.compile(r"^([AB])(\d{1,3})$")
PIXEL_BARCODE = re.compile(r"^([ACGTN]{8})([ACGTN]{8})(-\d+)?$")


class DbitFiles(StrEnum):
    """File name patterns (glob) in a DBiT-seq bundle."""

    H5AD = "*.h5ad"
    BARCODE_LIST = "*barcode_list*"  # spatialdata-io DbitKeys.BARCODE_POSITION
    COUNTS = "*.tsv"
    COUNTS_GZ = "*.tsv.gz"
    POSITION = "position*.txt"  # Pixel_identification.m output
    CORNERS = "corners.csv"


class CornerKeys(StrEnum):
    """Columns of the corners file."""

    SPOT = "spot"
    X = "x"
    Y = "y"


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    counts: str | os.PathLike[str] | None = None,
    barcode_list: str | os.PathLike[str] | None = None,
    positions: str | os.PathLike[str] | None = None,
    corners: str | os.PathLike[str] | None = None,
    channel_um: float = DEFAULT_CHANNEL_UM,
    tissue_only: bool = True,
    allow_mirror: bool = False,
    crop_box: str | tuple[float, float, float, float] | None = None,
    n_channels: int | None = None,
    crop_strips: Literal["2n-1", "n"] = "2n-1",
) -> Section:
    """Read a DBiT-seq bundle into a Section of square pixels in `AxB` index coordinates.

    Args:
        bundle: folder holding the counts (ST Pipeline tsv, or h5ad + barcode_list), optionally
            `position*.txt` and `corners.csv`.
        wsi: the H&E image the corners refer to (not opened here).
        section_id: defaults to the slug of the bundle folder name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of h5ad barcodes found in the barcode list.
        native_to_wsi: 3x3 affine, (A, B) index -> WSI level-0 pixels; wins over corners.
        counts: the count matrix (tsv or h5ad), overriding autodetection.
        barcode_list: the A/B barcode list (h5ad counts), overriding autodetection.
        positions: the on-tissue pixel list, overriding autodetection.
        corners: the corner landmarks CSV, overriding autodetection of `corners.csv`.
        channel_um: channel width (10, 25 or 50 um); the pixel pitch is twice that.
        tissue_only: keep only the pixels `position*.txt` lists (when there is one).
        allow_mirror: accept a corner fit that mirrors (a `BxA` convention).
        crop_box: "x0,y0,x1,y1", the working-region crop (WSI px) the lab's pixel
            identification used; places the grid instead of the corners.
        n_channels: channels per direction, for `crop_box` (default: 50, or 100 when an index
            exceeds 50).
        crop_strips: how `crop_box` divides into pixels: "2n-1" strips (the DBiT lab's
            script; channels and gaps alike) or "n" equal cells.

    Raises:
        BundleError: a missing, ambiguous or malformed file, pixel ids outside the grid, a match
            rate under the threshold, bad corners, or no way to place the pixels.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    channel = float(channel_um)
    if not channel > 0:
        raise ConfigError(f"channel_um must be positive, got {channel_um!r}")
    folder = bundle_folder(bundle)
    counts_file = explicit_file(counts, "counts") if counts else _find_counts(folder)
    qc: dict[str, float | int | str | bool] = {"channel_um": channel, "tissue_only": tissue_only}
    files = [counts_file]
    if counts_file.suffix == ".h5ad":
        list_file = (
            explicit_file(barcode_list, "barcode list")
            if barcode_list
            else _find_one(folder, DbitFiles.BARCODE_LIST, "barcode list", counts_file)
        )
        matrix, gene_ids, gene_names, pixel_ids = _read_h5ad(
            counts_file, list_file, min_match_rate, qc
        )
        files.append(list_file)
        layout = "h5ad_barcode_list"
    else:
        table, pixel_ids = read_st_pipeline_counts(counts_file)
        matrix, gene_ids, gene_names = table.counts, table.gene_ids, table.gene_ids
        layout = "st_pipeline_matrix"
    ab = _parse_pixel_ids(pixel_ids, counts_file)
    qc["n_matrix_pixels"] = len(pixel_ids)
    rows = np.arange(len(pixel_ids))
    position_file = (
        explicit_file(positions, "position file")
        if positions
        else _find_optional(folder, DbitFiles.POSITION)
    )
    if position_file is not None:
        files.append(position_file)
        listed = np.isin(pixel_ids, _read_position_file(position_file))
        qc["n_matrix_pixels_on_tissue"] = int(listed.sum())
        if tissue_only:
            rows = np.flatnonzero(listed)
            if len(rows) == 0:
                raise BundleError(position_file, f"lists none of the pixels of {counts_file}")
    qc["n_channels"] = n_channels or (50 if ab.max() <= 50 else MAX_CHANNELS)
    crop = None
    if crop_box is not None:
        crop = (_parse_crop_box(crop_box), int(qc["n_channels"]), crop_strips)
    matrix_placed, transform_files, source = _placement(
        folder, explicit, corners, channel, allow_mirror, qc, crop
    )
    files += transform_files
    panel = build_gene_panel(gene_ids, gene_names, matrix[rows])
    qc["n_control_probes"] = panel.n_controls
    qc["placement"] = source
    units = pd.DataFrame(
        {
            "unit_id": np.asarray(pixel_ids, dtype=object)[rows],
            "x_native": ab[rows, 0].astype(np.float64),
            "y_native": ab[rows, 1].astype(np.float64),
            "array_a": ab[rows, 0].astype(np.int32),
            "array_b": ab[rows, 1].astype(np.int32),
        }
    )
    if position_file is not None:
        units["in_tissue"] = listed[rows].astype(np.int8)
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=units,
        panel=panel,
        files=files,
        layout=f"{layout}+{source}",
        metadata=metadata,
        unit_shape="square",
        unit_size_um=channel,
        pitch_um=2.0 * channel,
        default_mode="spot",
        native_to_wsi=matrix_placed,
        native_um_per_unit=2.0 * channel,
        qc=qc,
    )


def _glob(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(str(pattern)) if p.is_file())


def _find_optional(folder: Path, pattern: str) -> Path | None:
    found = _glob(folder, pattern)
    if len(found) > 1:
        raise BundleError(folder, f"ambiguous: several {pattern} files {[p.name for p in found]}")
    return found[0] if found else None


def _find_one(folder: Path, pattern: str, what: str, needed_by: Path) -> Path:
    found = _find_optional(folder, pattern)
    if found is None:
        raise BundleError(
            folder,
            f"no {what} ({pattern}): {needed_by.name} names pixels by barcode, and the "
            "list mapping A1..An / B1..Bn to barcodes is needed to place them",
        )
    return found


def _find_counts(folder: Path) -> Path:
    h5ad = _glob(folder, DbitFiles.H5AD)
    tables = _glob(folder, DbitFiles.COUNTS) + _glob(folder, DbitFiles.COUNTS_GZ)
    tables = [p for p in tables if not p.match(str(DbitFiles.BARCODE_LIST))]
    candidates = h5ad + tables
    if len(candidates) != 1:
        what = "no counts" if not candidates else f"ambiguous counts {[p.name for p in candidates]}"
        raise BundleError(
            folder,
            f"{what}: a DBiT-seq bundle holds one ST Pipeline matrix (*.tsv[.gz], AxB "
            "pixel rows) or one *.h5ad (with a barcode_list); pass counts= to choose",
        )
    return candidates[0]


def _parse_pixel_ids(pixel_ids: np.ndarray, path: Path) -> np.ndarray:
    """(n, 2) int array of (A, B) from `AxB` ids; both within 1..MAX_CHANNELS."""
    parts = pd.Series(np.asarray(pixel_ids, dtype=object)).astype(str).str.extract(PIXEL_ID)
    bad = parts.isna().any(axis=1).to_numpy()
    if bad.any():
        examples = np.asarray(pixel_ids, dtype=object)[bad][:EXAMPLES].tolist()
        raise BundleError(
            path, f"pixel ids must be AxB channel indices (e.g. '12x40'), found {examples}"
        )
    ab = parts.astype(np.int64).to_numpy()
    outside = (ab < 1).any(axis=1) | (ab > MAX_CHANNELS).any(axis=1)
    if outside.any():
        examples = np.asarray(pixel_ids, dtype=object)[outside][:EXAMPLES].tolist()
        raise BundleError(path, f"pixel ids outside a {MAX_CHANNELS}-channel grid: {examples}")
    return ab


def _read_barcode_list(path: Path) -> dict[str, dict[str, int]]:
    """Map each A and B barcode to its index: {'A': {barcode: i}, 'B': {...}}."""
    try:
        frame = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as tab-separated text: {err}") from err
    if frame.shape[1] != 2:
        raise BundleError(
            path, f"expected 2 columns (A1/B1.., 8-nt barcode), found {frame.shape[1]}"
        )
    lists: dict[str, dict[str, int]] = {"A": {}, "B": {}}
    for label, barcode in zip(frame[0].str.strip(), frame[1].str.strip().str.upper(), strict=True):
        match = BARCODE_LABEL.match(label)
        if not match or not re.fullmatch(r"[ACGTN]{8}", barcode):
            raise BundleError(
                path, f"bad line {label!r} {barcode!r}: expected e.g. 'A12' and an 8-nt barcode"
            )
        if barcode in lists[match.group(1)]:
            raise BundleError(path, f"barcode {barcode} listed twice for {match.group(1)}")
        lists[match.group(1)][barcode] = int(match.group(2))
    if not lists["A"] or not lists["B"]:
        raise BundleError(path, "must list both A and B barcodes")
    return lists


def _read_h5ad(
    path: Path, list_file: Path, min_match_rate: float, qc: dict[str, float | int | str | bool]
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Return counts, gene ids and names, and the `AxB` ids of the resolvable obs barcodes."""
    try:
        adata = anndata.read_h5ad(path)
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(path, f"cannot read as h5ad: {err}") from err
    lists = _read_barcode_list(list_file)
    names = adata.obs_names.astype(str).to_numpy(object)
    parts = pd.Series(names).str.extract(PIXEL_BARCODE)
    a = parts[1].map(lists["A"])
    b = parts[0].map(lists["B"])
    located = (a.notna() & b.notna()).to_numpy()
    rate = float(located.mean()) if len(names) else 0.0
    qc["barcode_match_rate"] = rate
    if rate < min_match_rate:
        raise BundleError(
            path,
            f"only {int(located.sum())} of {len(names)} obs barcodes ({rate:.2%}) are a B "
            f"barcode then an A barcode of {list_file}; min_match_rate is {min_match_rate:.2%}. "
            f"Unmatched examples: {names[~located][:EXAMPLES].tolist()}",
        )
    ids = a[located].astype(int).astype(str) + "x" + b[located].astype(int).astype(str)
    ids = ids.to_numpy(object)
    if pd.Index(ids).has_duplicates:
        dupes = pd.Index(ids)[pd.Index(ids).duplicated()][:EXAMPLES].tolist()
        raise BundleError(path, f"several obs barcodes resolve to the same pixels {dupes}")
    var = adata.var
    gene_names = var.index.astype(str).to_numpy(object)
    id_column = next((c for c in ("gene_ids", "gene_id") if c in var.columns), None)
    gene_ids = var[id_column].astype(str).to_numpy(object) if id_column else gene_names
    counts = as_int32_counts(adata.X, path)[np.flatnonzero(located)]
    return sp.csr_matrix(counts), gene_ids, gene_names, ids


def _read_position_file(path: Path) -> np.ndarray:
    """Return the `AxB` tokens of a Pixel_identification.m position file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(path, f"cannot read: {err}") from err
    tokens = [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()]
    bad = [t for t in tokens if not PIXEL_ID.match(t)][:EXAMPLES]
    if bad or not tokens:
        raise BundleError(path, f"expected comma-separated AxB pixel ids, found {bad or 'none'}")
    return np.array(tokens, dtype=object)


def _placement(
    folder: Path,
    explicit: np.ndarray | None,
    corners: str | os.PathLike[str] | None,
    channel_um: float,
    allow_mirror: bool,
    qc: dict[str, float | int | str | bool],
    crop: tuple[tuple[float, float, float, float], int, str] | None = None,
) -> tuple[np.ndarray, list[Path], str]:
    """Return the index -> WSI affine, the files it came from and its source name."""
    if explicit is not None:
        return explicit, [], "explicit"
    if crop is not None:
        if corners:
            raise ConfigError("give corners or crop_box, not both")
        qc["crop_strips"] = crop[2]
        return crop_box_transform(*crop), [], f"crop_box_{crop[2]}"
    corners_file = (
        explicit_file(corners, "corners file")
        if corners
        else _find_optional(folder, DbitFiles.CORNERS)
    )
    if corners_file is None:
        raise BundleError(
            folder,
            "no way to place the pixels on the image: give the grid's corner pixels "
            f"({DbitFiles.CORNERS}: spot,x,y; or corners=), or build with --transform (AxB "
            "index -> pixel 3x3) or --landmarks",
        )
    return _fit_corners(corners_file, channel_um, allow_mirror, qc), [corners_file], "corners"


def crop_box_transform(
    box: tuple[float, float, float, float], n_channels: int, strips: str = "2n-1"
) -> np.ndarray:
    """(A, B) index -> WSI px for a working-region crop `box` = (x0, y0, x1, y1).

    "2n-1": n channels and n - 1 gaps of one width w = W / (2n - 1); channel A's centre is at
    x0 + (2A - 1.5) w, so the step is 2w. "n": n equal cells, centre x0 + (A - 0.5) W / n.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ConfigError(f"crop_box must be x0,y0,x1,y1 with x1 > x0 and y1 > y0, got {box}")
    if not 1 < n_channels <= MAX_CHANNELS:
        raise ConfigError(f"n_channels must be in 2..{MAX_CHANNELS}, got {n_channels}")
    if strips == "2n-1":
        sx, sy = 2 * (x1 - x0) / (2 * n_channels - 1), 2 * (y1 - y0) / (2 * n_channels - 1)
        first = 0.25  # channel 1's centre: half a width in, x0 + w / 2 = x0 + sx / 4
    elif strips == "n":
        sx, sy = (x1 - x0) / n_channels, (y1 - y0) / n_channels
        first = 0.5
    else:
        raise ConfigError(f"crop_strips must be '2n-1' or 'n', got {strips!r}")
    # index A = 1 sits at x0 + first * sx; each index step moves sx
    return np.array(
        [[sx, 0.0, x0 + (first - 1.0) * sx], [0.0, sy, y0 + (first - 1.0) * sy], [0.0, 0.0, 1.0]]
    )


def _parse_crop_box(
    value: str | tuple[float, float, float, float],
) -> tuple[float, float, float, float]:
    parts = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        box = tuple(float(v) for v in parts)
    except ValueError as err:
        raise ConfigError(f"crop_box must be 4 numbers x0,y0,x1,y1, got {value!r}") from err
    if len(box) != 4:
        raise ConfigError(f"crop_box must be 4 numbers x0,y0,x1,y1, got {value!r}")
    return box[0], box[1], box[2], box[3]


def _fit_corners(
    path: Path, channel_um: float, allow_mirror: bool, qc: dict[str, float | int | str | bool]
) -> np.ndarray:
    try:
        frame = pd.read_csv(path, dtype={CornerKeys.SPOT.value: str})
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as CSV: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    require_columns(frame, [k.value for k in CornerKeys], path, "corners file")
    src = _parse_pixel_ids(frame[CornerKeys.SPOT].to_numpy(object), path).astype(np.float64)
    dst = frame[[CornerKeys.X, CornerKeys.Y]].apply(pd.to_numeric, errors="coerce")
    dst_xy = dst.to_numpy(np.float64)
    if not np.isfinite(dst_xy).all():
        raise BundleError(path, "columns x, y hold non-numeric or missing values")
    try:
        fit = fit_affine(src, dst_xy, allow_mirror=allow_mirror)
    except RegistrationError as err:
        raise BundleError(path, f"corner landmarks rejected: {err}") from err
    scale = float(np.sqrt(abs(fit.determinant)))
    if not scale > 1e-9 * max(float(np.abs(fit.matrix[:2, :2]).max()), 1e-300):
        raise BundleError(path, "the corner fit is singular: the corners are mislabelled")
    um_per_px = 2.0 * channel_um / scale
    worst_um = fit.max * um_per_px
    qc["corner_rms_um"] = float(fit.rms * um_per_px)
    qc["corner_max_um"] = float(worst_um)
    qc["corner_fit_mirrored"] = fit.determinant < 0
    if worst_um > channel_um / 2.0:
        worst = frame[CornerKeys.SPOT].iloc[int(np.argmax(fit.residuals))]
        raise BundleError(
            path,
            f"corner {worst} lies {worst_um:.1f} um from where the fit of all corners puts "
            f"it (limit: half a {channel_um:g} um channel): a corner was misplaced or mislabelled",
        )
    return fit.matrix
