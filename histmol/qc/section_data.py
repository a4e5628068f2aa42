"""One committed section read back from the corpus, and images to draw it on.

QC figures, the report and the exporters all need the same things: the section's row in
sections.parquet, its units from every part (frames named in the columns, DESIGN.md "Coordinate
frames"), optionally the raw counts, and a picture of the slide. The corpus keeps the WSI's file
name only (no absolute paths, for byte identity), so the picture comes from the WSI when the
caller has it and otherwise from a mosaic of the stored patches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from PIL import Image

from histmol.errors import ConfigError, CorpusError
from histmol.shards.corpus import COMMITTED, Corpus
from histmol.shards.shard_reader import ShardReader
from histmol.tissue import TissueMask, slide_tissue_mask
from histmol.wsi import SlideReader, open_wsi

log = logging.getLogger(__name__)
SlideLike = SlideReader | str | os.PathLike[str]
BAND_SOURCE_PX = 16_000_000  # level pixels read at once while downsampling a slide
SCALAR_UNIT_COLUMNS = (
    "pair_index",
    "unit_id",
    "x_wsi_px",
    "y_wsi_px",
    "x_um",
    "y_um",
    "patch_x0_wsi_px",
    "patch_y0_wsi_px",
    "x_in_patch_px",
    "y_in_patch_px",
    "tissue_fraction",
    "total_counts",
)


@dataclass(frozen=True)
class StoredSection:
    """A committed section: its row, manifest parts and units (all parts, in pair order).

    `units` holds the scalar unit columns plus ``part``, ``pair`` (pair number across the
    section's parts) and ``n_genes_detected``; `counts` (units x vocabulary, raw int32) only when
    asked for.
    """

    root: Path
    row: dict[str, Any]
    parts: pd.DataFrame
    units: pd.DataFrame
    counts: sp.csr_matrix | None = None

    @property
    def section_id(self) -> str:
        """The section's id."""
        return str(self.row["section_id"])

    @property
    def mpp(self) -> float:
        """Level-0 um/px of the section's WSI."""
        return float(self.row["mpp"])

    @property
    def wsi_size(self) -> tuple[int, int]:
        """(width, height) of the WSI's level 0 in px."""
        return int(self.row["wsi_width"]), int(self.row["wsi_height"])

    @property
    def footprint_px(self) -> float:
        """Side of one patch on the slide, level-0 px."""
        stored = self.row.get("qc_footprint_px")
        if stored is not None and np.isfinite(stored):
            return float(stored)
        return float(self.row["patch_px"]) * float(self.row["target_mpp"]) / self.mpp

    @property
    def unit_size_px(self) -> float:
        """Unit diameter (circles) or side (squares) in level-0 px."""
        return float(self.row["unit_size_um"]) / self.mpp

    @property
    def native_to_wsi(self) -> np.ndarray:
        """The 3x3 affine from the platform's native frame to WSI level-0 px."""
        return np.asarray(self.row["native_to_wsi"], dtype=np.float64).reshape(3, 3)

    @property
    def options(self) -> dict[str, Any]:
        """The per-section build options recorded in ``section_options``."""
        return dict(json.loads(self.row.get("section_options") or "{}"))

    def pairs(self) -> pd.DataFrame:
        """One row per pair in pair order: pair, part, pair_index, x0/y0 (patch top-left, px)."""
        first = self.units.drop_duplicates("pair", keep="first")
        return pd.DataFrame(
            {
                "pair": first["pair"].to_numpy(),
                "part": first["part"].to_numpy(),
                "pair_index": first["pair_index"].to_numpy(),
                "x0": first["patch_x0_wsi_px"].to_numpy(),
                "y0": first["patch_y0_wsi_px"].to_numpy(),
            }
        )

    def dropped_patches(self) -> np.ndarray | None:
        """(n, 2) top-left corners (level-0 px) of patches dropped for low tissue, if recorded."""
        x0, y0 = self.row.get("dropped_patch_x0_wsi_px"), self.row.get("dropped_patch_y0_wsi_px")
        if x0 is None or y0 is None:
            return None
        return np.column_stack([np.asarray(x0, np.float64), np.asarray(y0, np.float64)])


def load_section(
    root: str | os.PathLike[str],
    section_id: str,
    *,
    counts: bool = False,
    genes: pd.DataFrame | None = None,
) -> StoredSection:
    """Read a committed section back; CorpusError when it is absent or not committed.

    `genes` is the corpus vocabulary (`Corpus.genes`) when the caller has read it already: it
    holds every reference gene, so reading it once per figure set is worth it.
    """
    corpus = Corpus.open(root)  # reads only: no lock, so a read-only corpus works
    rows = corpus.read_table("sections").to_pylist()
    row = next((r for r in rows if r["section_id"] == section_id), None)
    if row is None:
        known = ", ".join(r["section_id"] for r in rows[:20]) or "none"
        raise CorpusError(f"{corpus.root}: no section {section_id!r} (sections: {known})")
    if row["status"] != COMMITTED:
        reason = f": {row['reason']}" if row.get("reason") else ""
        raise CorpusError(f"{corpus.root}: section {section_id!r} is {row['status']}{reason}")
    manifest = corpus.manifest()
    parts = manifest[manifest["section_id"] == section_id].sort_values("part")
    if len(parts) != row["n_parts"]:
        raise CorpusError(
            f"{corpus.root}: section {section_id!r} lists {row['n_parts']} parts but the manifest "
            f"holds {len(parts)}: an interrupted commit; rebuild the section"
        )
    tables, pair_base = [], 0
    for part in parts.itertuples():
        path = corpus.root / part.units_path
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as error:
            raise CorpusError(f"{path}: unreadable units table ({error})") from error
        missing = [c for c in SCALAR_UNIT_COLUMNS if c not in table.column_names]
        if missing:
            raise CorpusError(f"{path}: units table lacks columns {missing}")
        pair_index = table.column("pair_index").to_numpy()
        table = table.append_column("part", pa.array(np.full(table.num_rows, part.part, np.int32)))
        table = table.append_column("pair", pa.array(pair_index.astype(np.int64) + pair_base))
        table = table.append_column("n_genes_detected", pc.list_value_length(table["gene_idx"]))
        pair_base += int(part.n_pairs)
        tables.append(table)
    table = pa.concat_tables(tables)
    scalar = [n for n in table.column_names if n not in ("gene_idx", "counts")]
    units = table.select(scalar).to_pandas()
    matrix = None
    if counts:
        vocab = (corpus.genes() if genes is None else genes)["index"].to_numpy()
        matrix = _csr(table, vocab)
    return StoredSection(corpus.root, row, parts.reset_index(drop=True), units, matrix)


def _csr(table: pa.Table, vocab: np.ndarray) -> sp.csr_matrix:
    """Units x genes.parquet rows CSR from the gene_idx/counts list columns (no Python lists).

    Columns are genes.parquet rows (`vocab` is its sorted ``index`` column): units hold stable
    gene indices, mapped here to their rows.
    """
    genes = table.column("gene_idx").combine_chunks()
    counts = table.column("counts").combine_chunks()
    offsets = genes.offsets.to_numpy()  # flatten() honours a sliced array's offset, .values not
    data = counts.flatten().to_numpy().astype(np.int32)
    stable = genes.flatten().to_numpy().astype(np.int64)
    indices = np.searchsorted(vocab, stable)
    if len(stable) and (indices.max() >= len(vocab) or not np.array_equal(vocab[indices], stable)):
        raise CorpusError("units reference gene indices that genes.parquet lacks")
    indptr = (offsets - offsets[0]).astype(np.int64)
    return sp.csr_matrix((data, indices.astype(np.int32), indptr),
                         shape=(table.num_rows, len(vocab)))


@dataclass(frozen=True)
class Background:
    """An RGB picture of the slide and how many level-0 px one of its px spans, per axis."""

    image: np.ndarray
    downsample_x: float
    downsample_y: float
    source: str  # "wsi" or "patches"

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """Matplotlib imshow extent (left, right, bottom, top) in level-0 px."""
        height, width = self.image.shape[:2]
        return 0.0, width * self.downsample_x, height * self.downsample_y, 0.0


def _output_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, round(width / factor)), max(1, round(height / factor))


def wsi_background(slide: SlideReader, factor: float) -> Background:
    """Downsample the slide `factor` times (box filter), reading bands to bound memory."""
    width, height = slide.dimensions
    factor = max(1.0, float(factor))
    out_w, out_h = _output_size(width, height, factor)
    level = slide.best_level_for_downsample(factor)
    level_w, level_h = slide.level_dimensions[level]
    scale_y = level_h / out_h  # level px per output px (the whole width maps onto out_w)
    image = np.empty((out_h, out_w, 3), dtype=np.uint8)
    band = max(1, int(BAND_SOURCE_PX / (level_w * scale_y)))
    for r0 in range(0, out_h, band):
        r1 = min(out_h, r0 + band)
        top, bottom = r0 * scale_y, r1 * scale_y
        y0, y1 = int(np.floor(top)), min(level_h, int(np.ceil(bottom)))
        pixels = slide.read_region(level, 0, y0, level_w, y1 - y0)
        box = (0.0, top - y0, float(level_w), bottom - y0)
        resized = Image.fromarray(pixels).resize((out_w, r1 - r0), Image.Resampling.BOX, box=box)
        image[r0:r1] = np.asarray(resized)
    return Background(image, width / out_w, height / out_h, "wsi")


def patch_background(section: StoredSection, factor: float) -> Background:
    """Draw the stored patches on white, `factor` level-0 px per mosaic px.

    Spot-mode patches overlap or leave gaps between units; later pairs are drawn over earlier
    ones. It shows what the corpus holds, which is what a reviewer without the WSI can check.
    """
    width, height = section.wsi_size
    factor = max(1.0, float(factor))
    out_w, out_h = _output_size(width, height, factor)
    scale_x, scale_y = width / out_w, height / out_h
    image = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    side = section.footprint_px
    pairs = section.pairs()
    for part in section.parts.itertuples():
        mine = pairs[pairs["part"] == part.part]
        with ShardReader(section.root / part.images_path) as reader:
            for pair_index, x0, y0 in zip(mine["pair_index"], mine["x0"], mine["y0"], strict=True):
                c0, c1 = round(x0 / scale_x), round((x0 + side) / scale_x)
                r0, r1 = round(y0 / scale_y), round((y0 + side) / scale_y)
                if c1 <= max(c0, 0) or r1 <= max(r0, 0) or c0 >= out_w or r0 >= out_h:
                    continue
                patch = Image.fromarray(reader.read_patch(int(pair_index)))
                tile = np.asarray(patch.resize((c1 - c0, r1 - r0), Image.Resampling.BOX))
                cc0, rr0 = max(c0, 0), max(r0, 0)
                cc1, rr1 = min(c1, out_w), min(r1, out_h)
                image[rr0:rr1, cc0:cc1] = tile[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
    return Background(image, scale_x, scale_y, "patches")


@contextlib.contextmanager
def matching_slide(section: StoredSection, slide: SlideLike | None) -> Iterator[SlideReader | None]:
    """Yield an open reader of `slide` (opened and closed here when given as a path).

    A slide whose level-0 size differs from the one the section was built on is refused: the
    units would be drawn on the wrong image.
    """
    if slide is None:
        yield None
        return
    owned = not isinstance(slide, SlideReader)
    reader = open_wsi(slide) if owned else slide
    try:
        if reader.path.name != section.row["wsi_name"]:
            log.warning(
                "%s: section %r was built on an image named %r; drawing on this one (same size)",
                reader.path,
                section.section_id,
                section.row["wsi_name"],
            )
        if tuple(reader.dimensions) != section.wsi_size:
            raise ConfigError(
                f"{reader.path}: the image is {reader.dimensions[0]} x {reader.dimensions[1]} px "
                f"but section {section.section_id!r} was built on {section.row['wsi_name']!r}, "
                f"{section.wsi_size[0]} x {section.wsi_size[1]} px: pass that image"
            )
        yield reader
    finally:
        if owned:
            reader.close()


def section_tissue_mask(section: StoredSection, slide: SlideReader) -> TissueMask:
    """Recompute the tissue mask the build used (same thumbnail scale, same segmentation)."""
    from histmol.config import BuildConfig

    tissue_mpp = section.options.get("tissue_mpp", BuildConfig.tissue_mpp)
    return slide_tissue_mask(slide, section.mpp, float(tissue_mpp))
