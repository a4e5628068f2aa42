"""Visium HD bin positions: Space Ranger's `tissue_positions.parquet` on a dense array grid.

Why a module of its own: a 2 um section lists ~11 M bins, so nothing here holds one Python object
or one DataFrame row per bin. The Parquet file is read in batches (without pre-buffering, which
keeps everything it read) into a dense uint8 grid over the array (11 MB for a 3350 x 3350 capture
area); barcodes are parsed from their fixed-width bytes (`s_002um_00012_00034-1` is array row
12, column 34) and checked against array_row/array_col; the array -> full-resolution pixel
affine is fitted by streamed least squares. Format: Space Ranger "Binned outputs" docs and
scverse/spatialdata-io `readers/visium_hd.py` (column names and order asserted there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histmol.errors import BundleError
from platform_adapters._common import EXAMPLES

POSITION_COLUMNS = (  # names and order as Space Ranger writes them
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
BARCODE_WIDTH = 21  # s_002um_00012_00034-1
BATCH_ROWS = 1 << 18
MAX_GRID_CELLS = 1 << 28  # ~16,000 bins a side: beyond any capture area
ABSENT, OUT_OF_TISSUE, IN_TISSUE, IN_MATRIX = 0, 1, 2, 4  # `PositionGrid.state` values / flag
_PLACE = np.array([10_000, 1_000, 100, 10, 1], np.int64)


def parse_barcodes(values: np.ndarray, bin_um: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(array_row, array_col, ok) of fixed-width barcodes `s_{bin:03d}um_{row:05d}_{col:05d}-1`."""
    n, width = len(values), values.dtype.itemsize
    rows, cols = np.zeros(n, np.int64), np.zeros(n, np.int64)
    if values.dtype.kind != "S" or width < BARCODE_WIDTH or n == 0:
        return rows, cols, np.zeros(n, bool)
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(n, width)
    ok = (raw[:, BARCODE_WIDTH:] == 0).all(axis=1)  # longer dtype: only NUL padding allowed
    prefix = np.frombuffer(f"s_{bin_um:03d}um_".encode(), np.uint8)
    ok &= (raw[:, :8] == prefix).all(axis=1) & (raw[:, 13] == ord("_"))
    ok &= (raw[:, 19] == ord("-")) & (raw[:, 20] == ord("1"))
    digits = raw[:, [8, 9, 10, 11, 12, 14, 15, 16, 17, 18]] - np.uint8(ord("0"))
    ok &= (digits <= 9).all(axis=1)
    digits = digits.astype(np.int64)
    return digits[:, :5] @ _PLACE, digits[:, 5:] @ _PLACE, ok


def format_barcodes(row: np.ndarray, col: np.ndarray, bin_um: int) -> pa.StringArray:
    """Barcodes `s_{bin:03d}um_{row:05d}_{col:05d}-1` of bins, built without Python strings.

    Why: a 2 um section has ~7 M bins in tissue; one Python str each would cost ~550 MB. The
    fixed-width bytes become an Arrow string array in place (offsets every 21 bytes).
    """
    n = len(row)
    raw = np.empty((n, BARCODE_WIDTH), np.uint8)
    raw[:, :8] = np.frombuffer(f"s_{bin_um:03d}um_".encode(), np.uint8)
    raw[:, 13], raw[:, 19], raw[:, 20] = ord("_"), ord("-"), ord("1")
    for k, place in enumerate(_PLACE):
        raw[:, 8 + k] = (row // place) % 10 + ord("0")
        raw[:, 14 + k] = (col // place) % 10 + ord("0")
    offsets = np.arange(0, (n + 1) * BARCODE_WIDTH, BARCODE_WIDTH, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(raw)])


@dataclass
class PositionGrid:
    """A bin folder's positions on a dense grid over the array (origin at the smallest index).

    `state[r - row0, c - col0]` is ABSENT, OUT_OF_TISSUE or IN_TISSUE. `fit` (2 x 3) maps
    (array_col, array_row, 1) to full-resolution (x, y) px by least squares (None with fewer
    than 3 non-collinear bins). `x`/`y` hold each bin's own pixel position when kept.
    """

    path: Path
    bin_um: int
    row0: int
    col0: int
    state: np.ndarray
    fit: np.ndarray | None
    residual_rms_px: float
    residual_max_px: float
    n_rows: int
    n_in_tissue: int
    column_order: str
    x: np.ndarray | None = None
    y: np.ndarray | None = None

    @property
    def complete(self) -> bool:
        """Every bin of the grid's extent is listed (Space Ranger lists the whole capture area)."""
        return self.n_rows == self.state.size

    def apply_fit(self, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution px of (fractional) array indices through the fitted affine."""
        if self.fit is None:
            raise BundleError(self.path, "fewer than 3 non-collinear bins: cannot fit array -> px")
        f = self.fit
        return f[0, 0] * col + f[0, 1] * row + f[0, 2], f[1, 0] * col + f[1, 1] * row + f[1, 2]


def _open_parquet(path: Path) -> tuple[pq.ParquetFile, str]:
    """Open and check the schema: named columns required; order reported, not enforced."""
    try:
        parquet = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering keeps what it read
    except (OSError, ValueError, pa.ArrowException) as err:
        raise BundleError(
            path, f"cannot read as Parquet (truncated or not Parquet): {err}"
        ) from err
    found = list(parquet.schema_arrow.names)
    missing = [c for c in POSITION_COLUMNS if c not in found]
    if missing:
        raise BundleError(
            path,
            f"positions table lacks columns {missing}; found columns {found}, expected "
            f"{list(POSITION_COLUMNS)} (Space Ranger's names and order)",
        )
    types = {name: parquet.schema_arrow.field(name).type for name in POSITION_COLUMNS}
    if not (pa.types.is_string(types["barcode"]) or pa.types.is_large_string(types["barcode"])):
        raise BundleError(path, f"column barcode must hold strings, not {types['barcode']}")
    bad = [
        n
        for n in POSITION_COLUMNS[1:]
        if not (pa.types.is_integer(types[n]) or pa.types.is_floating(types[n]))
    ]
    if bad:
        raise BundleError(
            path, f"columns {bad} must be numeric; types {[str(types[n]) for n in bad]}"
        )
    order = "spaceranger" if found == list(POSITION_COLUMNS) else "reordered"
    return parquet, order


def _batches(
    parquet: pq.ParquetFile, path: Path, columns: list[str]
) -> Iterator[dict[str, np.ndarray]]:
    """Column batches as numpy arrays; integers checked integral, numbers checked finite."""
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            out: dict[str, np.ndarray] = {}
            for name in columns:
                column = batch.column(name)
                if column.null_count:
                    raise BundleError(path, f"column {name} holds missing values")
                if name == "barcode":
                    out[name] = _fixed_width(column, path)
                    continue
                values = column.to_numpy(zero_copy_only=False)
                if not np.isfinite(values).all():
                    raise BundleError(path, f"column {name} holds non-finite values")
                if name.startswith(("array_", "in_")):
                    if values.dtype.kind == "f" and (values != np.floor(values)).any():
                        raise BundleError(path, f"column {name} holds non-integer values")
                    values = values.astype(np.int64)
                out[name] = values
            yield out
    except (OSError, ValueError, pa.ArrowException) as err:
        raise BundleError(
            path, f"cannot read the positions (truncated or corrupt): {err}"
        ) from err


def _fixed_width(column: pa.Array, path: Path) -> np.ndarray:
    """Strings of one width as fixed-width bytes, straight from the Arrow buffers."""
    column = column.cast(pa.string())
    offsets = np.frombuffer(column.buffers()[1], np.int32)[
        column.offset : column.offset + len(column) + 1
    ]
    lengths = np.diff(offsets)
    if len(column) and (lengths != BARCODE_WIDTH).any():
        odd = [column[int(i)].as_py() for i in np.flatnonzero(lengths != BARCODE_WIDTH)[:EXAMPLES]]
        raise BundleError(
            path, f"barcodes not in Space Ranger's s_XXXum_RRRRR_CCCCC-1 form: {odd}"
        )
    data = (
        np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        if len(column)
        else b""
    )
    return np.frombuffer(bytes(data), f"S{BARCODE_WIDTH}")


def _check_barcodes(batch: dict[str, np.ndarray], bin_um: int, path: Path) -> None:
    """Each barcode must be `s_{bin:03d}um_{array_row:05d}_{array_col:05d}-1` of its own row."""
    row, col, ok = parse_barcodes(batch["barcode"], bin_um)
    bad = np.flatnonzero(~ok | (row != batch["array_row"]) | (col != batch["array_col"]))
    if len(bad):
        examples = [
            (batch["barcode"][k].decode(), int(batch["array_row"][k]), int(batch["array_col"][k]))
            for k in bad[:EXAMPLES]
        ]
        raise BundleError(path, (
            f"barcodes do not name their array_row/array_col as s_{bin_um:03d}um_RRRRR_CCCCC-1 "
            f"(barcode, array_row, array_col): {examples}"
        ))


def _fit_pass(
    parquet: pq.ParquetFile, path: Path, bin_um: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """Check every row; return the row count, smallest and largest (row, col) and the fit.

    The fit sums the least-squares normal equations batch by batch, around the first batch's
    means so that the sums stay well conditioned.
    """
    n_rows, lo, hi = 0, np.full(2, np.inf), np.full(2, -np.inf)
    normal, rhs, shift = np.zeros((3, 3)), np.zeros((3, 2)), np.zeros(4)
    for b in _batches(parquet, path, list(POSITION_COLUMNS)):
        _check_barcodes(b, bin_um, path)
        if not np.isin(b["in_tissue"], (0, 1)).all():
            raise BundleError(path, "in_tissue must be 0 or 1")
        if not len(b["in_tissue"]):
            continue
        row, col = b["array_row"].astype(np.float64), b["array_col"].astype(np.float64)
        x, y = b["pxl_col_in_fullres"], b["pxl_row_in_fullres"]
        if n_rows == 0:
            shift = np.array([col.mean(), row.mean(), x.mean(), y.mean()])
        lo = np.minimum(lo, [row.min(), col.min()])
        hi = np.maximum(hi, [row.max(), col.max()])
        design = np.column_stack([col - shift[0], row - shift[1], np.ones(len(col))])
        normal += design.T @ design
        rhs += design.T @ np.column_stack([x - shift[2], y - shift[3]])
        n_rows += len(col)
    if n_rows == 0:
        raise BundleError(path, "positions table is empty")
    if np.linalg.matrix_rank(normal) < 3:
        return n_rows, lo, hi, None
    beta = np.linalg.solve(normal, rhs)  # rows: d/dcol, d/drow, intercept; columns: x, y
    fit = np.empty((2, 3))
    fit[:, :2] = beta[:2].T
    fit[:, 2] = beta[2] + shift[2:] - beta[0] * shift[0] - beta[1] * shift[1]
    return n_rows, lo, hi, fit


def read_positions(path: Path, bin_um: int, *, keep_pixels: bool) -> PositionGrid:
    """Read and check `tissue_positions.parquet` in two streamed passes.

    Pass 1 checks each barcode against its array_row/array_col and bin size, in_tissue in {0, 1},
    and fits the array -> pixel affine. Pass 2 fills the grid (a bin listed twice is an error)
    and measures the fit's residuals.
    """
    parquet, order = _open_parquet(path)
    n_rows, lo, hi, fit = _fit_pass(parquet, path, bin_um)
    if lo.min() < 0:
        raise BundleError(path, f"negative array indices (smallest row, col: {lo.tolist()})")
    row0, col0 = int(lo[0]), int(lo[1])
    shape = (int(hi[0]) - row0 + 1, int(hi[1]) - col0 + 1)
    if shape[0] * shape[1] > MAX_GRID_CELLS:
        raise BundleError(path, f"array indices span {shape[0]} x {shape[1]} bins: no capture area")
    state = np.zeros(shape, np.uint8)
    x = np.full(shape, np.nan) if keep_pixels else None
    y = np.full(shape, np.nan) if keep_pixels else None
    grid = PositionGrid(path, bin_um, row0, col0, state, fit, 0.0, 0.0, n_rows, 0, order, x, y)
    sum_sq, worst = 0.0, 0.0
    for b in _batches(parquet, path, list(POSITION_COLUMNS[1:])):
        r, c = b["array_row"] - row0, b["array_col"] - col0
        flat = r * shape[1] + c
        if (state.ravel()[flat] != ABSENT).any() or len(np.unique(flat)) < len(flat):
            raise BundleError(path, "a bin (array_row, array_col) is listed twice")
        state[r, c] = np.where(b["in_tissue"] == 1, IN_TISSUE, OUT_OF_TISSUE)
        px, py = b["pxl_col_in_fullres"], b["pxl_row_in_fullres"]
        if x is not None and y is not None:
            x[r, c], y[r, c] = px, py
        if fit is not None:
            fx, fy = grid.apply_fit(b["array_col"], b["array_row"])
            dist = np.hypot(fx - px, fy - py)
            sum_sq += float((dist**2).sum())
            worst = max(worst, float(dist.max(initial=0.0)))
    grid.residual_rms_px, grid.residual_max_px = float(np.sqrt(sum_sq / n_rows)), worst
    grid.n_in_tissue = int((state == IN_TISSUE).sum())
    return grid
