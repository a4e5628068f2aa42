"""Synthetic 10x Visium (Space Ranger 1.x / 2.x) bundles over a synthetic slide.

Why: the Visium adapter must be tested on the exact files Space Ranger writes, with a known
answer. Space Ranger places spots in the frame of the full-resolution image it was given, which
is often the scanner's WSI rotated or flipped; so by default the native frame here is the slide
rotated 90 degrees counter-clockwise and then mirrored left-right (determinant -1), and the
ground-truth `native_to_wsi` is written beside the bundle like Xenium's alignment CSV.

Files (under `<out_dir>/outs/`), per the Space Ranger output docs
(https://www.10xgenomics.com/support/software/space-ranger/latest/analysis/outputs):
`spatial/tissue_positions_list.csv` (1.x: no header) or `spatial/tissue_positions.csv` (2.x:
header), `spatial/scalefactors_json.json`, `spatial/tissue_{hires,lowres}_image.png`, and
`filtered_feature_bc_matrix.h5` (CSC, genes x barcodes) or `filtered_feature_bc_matrix/` (MEX).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tifffile
from PIL import Image
from scipy import ndimage

from histmol.synth.expression import GroundTruth, circle_area_um2, gene_panel, simulate_counts
from histmol.synth.morphology import SyntheticSlide

N_ROWS, N_COLS = 78, 128  # array_row 0..77, array_col 0..127 with (row + col) even: 4,992 spots
PITCH_UM = 100.0  # centre-to-centre, same row
SPOT_UM = 55.0
# Space Ranger's spot_diameter_fullres spans 'a theoretical 65 um spot' (Space Ranger 1.3 docs).
SCALEFACTOR_SPOT_UM = 65.0
FIDUCIAL_TO_SPOT = 1.6154  # fiducial_diameter_fullres / spot_diameter_fullres in real bundles
HIRES_SIDE, LOWRES_SIDE = 2000, 600
ARRAY_ROTATION_DEG = 0.35  # arrays never sit perfectly square to the image
POSITION_COLUMNS = (
    "barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"
)
SOFTWARE_VERSION = {"spaceranger1": "spaceranger-1.3.1", "spaceranger2": "spaceranger-2.1.0"}
_BARCODE_SEED = 1007  # the "whitelist" is fixed, like the real visium-v1 barcode list


def default_native_to_wsi(width: int, height: int) -> np.ndarray:
    """Native (fullres) -> WSI for a fullres image that is the WSI rotated 90 deg CCW, then flipped.

    A WSI point (x, y) lands at native (H - y, W - x), so x_wsi = W - y_native and
    y_wsi = H - x_native (continuous pixel coordinates, pixel edges at integers).
    """
    return np.array([[0.0, -1.0, float(width)], [-1.0, 0.0, float(height)], [0.0, 0.0, 1.0]])


def visium_barcodes() -> pd.DataFrame:
    """The fixed barcode list: one 16-nt barcode ('-1' suffixed) per (array_row, array_col)."""
    rows, cols = np.meshgrid(np.arange(N_ROWS), np.arange(N_COLS), indexing="ij")
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    rng = np.random.default_rng(_BARCODE_SEED)
    codes = rng.integers(0, 4, (rows.size, 16))
    nt = np.array(list("ACGT"))
    barcodes = np.array(["".join(nt[c]) + "-1" for c in codes], dtype=object)
    if len(set(barcodes)) != len(barcodes):  # pragma: no cover - 4**16 space, fixed seed
        raise RuntimeError("barcode collision in the synthetic Visium list")
    order = rng.permutation(rows.size)  # Space Ranger lists spots in whitelist order
    return pd.DataFrame({"barcode": barcodes, "array_row": rows, "array_col": cols}).iloc[order]


def _apply(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a 3x3 affine to column vectors (x, y, 1)."""
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def _native_extent(m: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """Size (w, h) of the fullres image: the WSI's corners mapped into the native frame."""
    inv = np.linalg.inv(m)
    cx = np.array([0.0, width, 0.0, width])
    cy = np.array([0.0, 0.0, height, height])
    nx, ny = _apply(inv, cx, cy)
    return int(np.ceil(nx.max() - 1e-6)), int(np.ceil(ny.max() - 1e-6))


def render_native_image(slide: SyntheticSlide, native_to_wsi: np.ndarray, scale: float,
                        size: tuple[int, int]) -> np.ndarray:
    """The native-frame image downsampled by `scale` (Space Ranger's hires/lowres PNGs).

    Samples the pyramid level closest above the needed resolution bilinearly; outside the WSI
    is white, as Space Ranger pads.
    """
    with tifffile.TiffFile(slide.path) as tif:
        pages = [p for p in tif.pages if p.is_tiled]
        det = abs(np.linalg.det(native_to_wsi[:2, :2]))
        wsi_px_per_out_px = np.sqrt(det) / scale
        level = 0
        while level + 1 < len(pages) and 2 ** (level + 1) <= wsi_px_per_out_px:
            level += 1
        image = pages[level].asarray()
    down = slide.width / image.shape[1]
    w, h = size
    jj, ii = np.meshgrid((np.arange(w) + 0.5) / scale, (np.arange(h) + 0.5) / scale)
    wx, wy = _apply(native_to_wsi, jj, ii)
    coords = np.stack([wy / down - 0.5, wx / down - 0.5])
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        out[..., c] = np.clip(
            ndimage.map_coordinates(image[..., c], coords, order=1, mode="constant", cval=255.0),
            0, 255,
        ).round().astype(np.uint8)
    return out


def _spot_samples(slide: SyntheticSlide, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Region labels at 7 points inside each spot (centre + ring at 60 % radius): (n, 7)."""
    r_px = 0.6 * SPOT_UM / 2.0 / slide.mpp
    angles = np.arange(6) * np.pi / 3.0
    ox = np.concatenate([[0.0], r_px * np.cos(angles)])
    oy = np.concatenate([[0.0], r_px * np.sin(angles)])
    return slide.region_at(x[:, None] + ox[None, :], y[:, None] + oy[None, :])


def _write_text_gz(path: Path, text: str) -> None:
    """Write gzip with no timestamp or name in the header, so reruns are byte-identical."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode())


def _write_mex(folder: Path, genes: pd.DataFrame, barcodes: np.ndarray, counts: sp.csr_matrix,
               software: str) -> None:
    """Cell Ranger 3+ MEX folder: matrix.mtx.gz (genes x barcodes), features, barcodes."""
    folder.mkdir(parents=True, exist_ok=True)
    coo = counts.tocoo()  # units x genes, CSR order = by barcode then gene
    lines = [
        "%%MatrixMarket matrix coordinate integer general",
        f'%metadata_json: {{"software_version": "{software}", "format_version": 2}}',
        f"{counts.shape[1]} {counts.shape[0]} {counts.nnz}",
    ]
    entries = zip(coo.col + 1, coo.row + 1, coo.data, strict=True)
    body = "\n".join(f"{g} {b} {v}" for g, b, v in entries)
    text = "\n".join(lines) + "\n" + body + ("\n" if body else "")
    _write_text_gz(folder / "matrix.mtx.gz", text)
    columns = zip(genes["gene_id"], genes["symbol"], genes["feature_type"], strict=True)
    features = "".join(f"{i}\t{s}\t{t}\n" for i, s, t in columns)
    _write_text_gz(folder / "features.tsv.gz", features)
    _write_text_gz(folder / "barcodes.tsv.gz", "".join(f"{b}\n" for b in barcodes))


def _fixed(values: np.ndarray | list[str]) -> np.ndarray:
    """Fixed-length byte strings, as Cell Ranger stores strings in HDF5."""
    encoded = [str(v).encode() for v in values]
    return np.array(encoded, dtype=f"S{max([len(e) for e in encoded] + [1])}")


def _write_h5(path: Path, genes: pd.DataFrame, barcodes: np.ndarray, counts: sp.csr_matrix,
              software: str) -> None:
    """The 10x HDF5 feature-barcode matrix: CSC over barcodes (genes x barcodes)."""
    csr = counts.tocsr()
    csr.sort_indices()
    opts = {"compression": "gzip", "compression_opts": 4, "shuffle": False, "track_times": False}
    with h5py.File(path, "w", libver="earliest") as f:
        f.attrs["chemistry_description"] = np.bytes_("Spatial 3' v1")
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["library_ids"] = _fixed(["synthetic"])
        f.attrs["original_gem_groups"] = np.array([1], np.int64)
        f.attrs["software_version"] = np.bytes_(software)
        f.attrs["version"] = np.int64(2)
        m = f.create_group("matrix", track_times=False)
        m.create_dataset("barcodes", data=_fixed(barcodes), **opts)
        m.create_dataset("data", data=csr.data.astype(np.int32), **opts)
        m.create_dataset("indices", data=csr.indices.astype(np.int64), **opts)
        m.create_dataset("indptr", data=csr.indptr.astype(np.int64), **opts)
        m.create_dataset("shape", data=np.array([csr.shape[1], csr.shape[0]], np.int32), **opts)
        feats = m.create_group("features", track_times=False)
        feats.create_dataset("_all_tag_keys", data=_fixed(["genome"]), **opts)
        feats.create_dataset("feature_type", data=_fixed(genes["feature_type"]), **opts)
        feats.create_dataset("genome", data=_fixed(["GRCh38"] * len(genes)), **opts)
        feats.create_dataset("id", data=_fixed(genes["gene_id"]), **opts)
        feats.create_dataset("name", data=_fixed(genes["symbol"]), **opts)


def write_transform_csv(path: Path, matrix: np.ndarray) -> None:
    """3 rows of 3 comma-separated floats, no header (the Xenium alignment CSV layout)."""
    rows = [",".join(repr(float(v)) for v in row) for row in np.asarray(matrix, np.float64)]
    path.write_text("\n".join(rows) + "\n")


def write_visium_bundle(
    out_dir: str | os.PathLike[str],
    slide: SyntheticSlide,
    *,
    layout: Literal["spaceranger1", "spaceranger2"] = "spaceranger2",
    matrix: Literal["h5", "mtx"] = "h5",
    native_to_wsi: np.ndarray | None = None,
    seed: int = 0,
    n_genes: int = 200,
) -> GroundTruth:
    """Write a Space Ranger `outs/` folder for `slide` and return what it encodes.

    Spots are the real Visium array (hexagonal, 100 um pitch, 55 um spots) centred on the
    slide and slightly rotated; only spots whose whole disc lies on the slide are listed. The
    filtered matrix holds the in-tissue spots (barcodes sorted, as Space Ranger writes them).
    `<out_dir>/native_to_wsi.csv` holds the ground-truth transform for `--transform`.
    """
    if layout not in SOFTWARE_VERSION:
        raise ValueError(f"layout must be one of {sorted(SOFTWARE_VERSION)}, got {layout!r}")
    if matrix not in ("h5", "mtx"):
        raise ValueError(f"matrix must be 'h5' or 'mtx', got {matrix!r}")
    out_dir = Path(out_dir)
    outs = out_dir / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    m = (default_native_to_wsi(slide.width, slide.height) if native_to_wsi is None
         else np.asarray(native_to_wsi, np.float64))
    if m.shape != (3, 3) or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise ValueError("native_to_wsi must be an invertible 3x3 affine")
    native_w, native_h = _native_extent(m, slide.width, slide.height)
    mpp_native = slide.mpp * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))

    spots = visium_barcodes()
    ax = (spots["array_col"].to_numpy() - (N_COLS - 1) / 2.0) * PITCH_UM / 2.0
    ay = (spots["array_row"].to_numpy() - (N_ROWS - 1) / 2.0) * PITCH_UM * np.sqrt(3.0) / 2.0
    phi = np.deg2rad(ARRAY_ROTATION_DEG)
    nx = (np.cos(phi) * ax - np.sin(phi) * ay) / mpp_native + native_w / 2.0
    ny = (np.sin(phi) * ax + np.cos(phi) * ay) / mpp_native + native_h / 2.0
    px_col, px_row = np.round(nx).astype(np.int64), np.round(ny).astype(np.int64)
    wx, wy = _apply(m, px_col.astype(np.float64), px_row.astype(np.float64))
    r = SPOT_UM / 2.0 / slide.mpp
    fits = (wx - r >= 0) & (wy - r >= 0) & (wx + r <= slide.width) & (wy + r <= slide.height)
    spots, px_col, px_row, wx, wy = spots[fits], px_col[fits], px_row[fits], wx[fits], wy[fits]
    samples = _spot_samples(slide, wx, wy)
    in_tissue = (samples > 0).any(axis=1)

    positions = pd.DataFrame({
        "barcode": spots["barcode"].to_numpy(), "in_tissue": in_tissue.astype(np.int64),
        "array_row": spots["array_row"].to_numpy(), "array_col": spots["array_col"].to_numpy(),
        "pxl_row_in_fullres": px_row, "pxl_col_in_fullres": px_col,
    })
    if layout == "spaceranger1":
        positions.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    else:
        positions.to_csv(spatial / "tissue_positions.csv", header=True, index=False)

    spot_px = SCALEFACTOR_SPOT_UM / mpp_native
    hires = min(1.0, HIRES_SIDE / max(native_w, native_h))
    lowres = min(1.0, LOWRES_SIDE / max(native_w, native_h))
    scalefactors = {
        "tissue_hires_scalef": hires, "tissue_lowres_scalef": lowres,
        "fiducial_diameter_fullres": spot_px * FIDUCIAL_TO_SPOT, "spot_diameter_fullres": spot_px,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    for name, scale in (("tissue_hires_image.png", hires), ("tissue_lowres_image.png", lowres)):
        size = (max(1, round(native_w * scale)), max(1, round(native_h * scale)))
        buf = io.BytesIO()
        Image.fromarray(render_native_image(slide, m, scale, size)).save(buf, format="PNG")
        (spatial / name).write_bytes(buf.getvalue())

    order = np.argsort(positions["barcode"].to_numpy().astype(str), kind="stable")
    order = order[in_tissue[order]]
    genes = gene_panel(n_genes)
    counts = simulate_counts(
        samples[order], n_genes=n_genes, unit_area_um2=circle_area_um2(SPOT_UM), seed=seed,
        genes=genes, region_names=slide.region_names,
    )
    barcodes = positions["barcode"].to_numpy()[order]
    software = SOFTWARE_VERSION[layout]
    if matrix == "h5":
        _write_h5(outs / "filtered_feature_bc_matrix.h5", genes, barcodes, counts, software)
    else:
        _write_mex(outs / "filtered_feature_bc_matrix", genes, barcodes, counts, software)
    transform_path = out_dir / "native_to_wsi.csv"
    write_transform_csv(transform_path, m)

    xn, yn = px_col[order].astype(np.float64), px_row[order].astype(np.float64)
    return GroundTruth(
        platform="visium", bundle=outs, wsi_path=Path(slide.path), wsi_mpp=slide.mpp,
        native_to_wsi=m, unit_ids=barcodes.astype(object), x_native=xn, y_native=yn,
        x_wsi_px=wx[order], y_wsi_px=wy[order], x_slide_px=wx[order], y_slide_px=wy[order],
        region=samples[order, 0].astype(np.int64), in_tissue=in_tissue[order], counts=counts,
        genes=genes, unit_size_um=SPOT_UM, transform_path=transform_path,
        region_names=slide.region_names,
        extra={"layout": layout, "matrix": matrix, "mpp_native": mpp_native,
               "fullres_size": (native_w, native_h), "n_positions": len(positions)},
    )
