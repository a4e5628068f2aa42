"""Per-section QC figures (PNG): what a curator looks at to accept or reject a section.

Written to ``<out_dir>/<section_id>/``:

- ``overview.png``: the slide (the WSI when given, else a mosaic of the stored patches) with
  every unit painted at its true size and coloured by total counts, the tissue contour (WSI
  only), the kept patches and, when the corpus records them, the patches dropped for low
  tissue; the QC numbers in the title.
- ``zoom.png``: one pair at full resolution: the WSI around it with unit outlines at their true
  size (misregistration shows as outlines off the tissue features) and the stored patch with the
  outlines of the units it carries.
- ``metrics.png``: genes-detected map, total-counts histogram, the mpp sources (embedded,
  bundle scale factors, unit pitch) against the tolerance, and the lattice residuals: distances
  between neighbouring units in um against the platform's nominal pitch.
- ``genes.png``: total counts beside the expression of a few informative genes (the section's
  most variable, or the ones asked for) over the same histology (`histmol.qc.gene_maps`).
- ``thumbnail.png``: a small overview for the corpus report.

Drawing uses matplotlib's object API on an Agg canvas (no pyplot, no global state), and PNGs are
written without the "Software" tag, so the same corpus gives the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from histmol.qc.figure_panels import draw_metrics, draw_zoom, read_zoom_crop
from histmol.qc.gene_maps import DEFAULT_N_GENES, gene_maps_figure, pick_genes
from histmol.qc.measures import UnitPixels, blend_units, mpp_check, paint_units
from histmol.qc.section_data import (
    Background,
    SlideLike,
    StoredSection,
    load_section,
    matching_slide,
    patch_background,
    section_tissue_mask,
    wsi_background,
)
from histmol.shards.atomic import is_temp_name, naming_path, remove_path, temp_name
from histmol.shards.corpus import Corpus
from histmol.tissue import TissueMask

OVERVIEW_SIDE = 1400  # background px on the slide's longer side
OVERVIEW_PX = 1000  # overview panel px on the slide's longer side (the axes are about 900)
THUMBNAIL_PX = 360
UNITS_ALPHA = 0.75
FIGURE_NAMES = ("overview", "zoom", "metrics", "genes", "thumbnail")
CMAP = "viridis"
TISSUE_COLOUR, KEPT_COLOUR, DROPPED_COLOUR = "#00e5ff", "white", "#ff2d2d"


def write_section_figures(
    corpus_root: str | os.PathLike[str],
    section_id: str,
    out_dir: str | os.PathLike[str],
    *,
    slide: SlideLike | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int = DEFAULT_N_GENES,
) -> list[Path]:
    """Write the section's QC PNGs into ``out_dir/section_id/``; return their paths.

    `slide` (an open SlideReader or a path) must be the image the section was built on (same
    level-0 size); without it the figures use the stored patches and omit the tissue contour.
    `genes` (symbols or ids) are drawn in ``genes.png``; without them, the `n_genes` most
    variable. Each file is written under a temporary name and renamed, so a reader never sees
    half a PNG.
    """
    vocabulary = Corpus.open(corpus_root).genes()
    section = load_section(corpus_root, section_id, counts=True, genes=vocabulary)
    maps = pick_genes(section, vocabulary, genes, n_genes)
    folder = Path(out_dir) / section.section_id
    folder.mkdir(parents=True, exist_ok=True)
    for debris in [p for p in folder.iterdir() if is_temp_name(p.name)]:
        remove_path(debris)  # half-written PNGs of a killed run (one writer per section)
    with matching_slide(section, slide) as reader:
        factor = max(section.wsi_size) / OVERVIEW_SIDE
        background = wsi_background(reader, factor) if reader else patch_background(section, factor)
        mask = section_tissue_mask(section, reader) if reader else None
        crop = read_zoom_crop(section, reader) if reader else None
    layer = UnitLayer.of(section, background)
    figures = {
        "overview": overview_figure(section, background, mask, layer),
        "zoom": draw_zoom(section, crop),
        "metrics": draw_metrics(section, background, layer.over),
        "genes": gene_maps_figure(
            section,
            background,
            maps,
            layer.over,
            caption="given genes" if genes else "most variable genes",
        ),
        "thumbnail": thumbnail_figure(section, background, mask, layer),
    }
    return [_save(figure, folder / f"{name}.png") for name, figure in figures.items()]


def _save(figure: Figure, path: Path) -> Path:
    """Render once and write an opaque RGB PNG (no "Software" tag) atomically.

    `savefig` draws a constrained-layout figure twice (once to lay it out, once to render);
    drawing the canvas lays out and renders in one pass. The figures are opaque, so RGB is the
    same picture as matplotlib's RGBA with a quarter less to compress.
    """
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    tmp = path.with_name(temp_name(path.name))
    with naming_path(path):  # a full disk names the figure
        rgb.save(tmp, format="png", compress_level=1, dpi=(figure.dpi, figure.dpi))
        os.replace(tmp, path)
    return path


def qc_title(section: StoredSection) -> str:
    """Summarise the numbers that decide whether a section is usable, one topic per line."""
    row = section.row
    planned = int(row.get("qc_n_pairs_planned") or row["n_pairs"])
    dropped = int(row.get("qc_n_pairs_dropped_tissue") or 0)
    counts = section.units["total_counts"].to_numpy()
    labels = " / ".join(str(row[k]) for k in ("platform", "tissue", "species") if row.get(k))
    check = mpp_check(section)
    pitch = check.candidates.get("estimated_from_pitch")
    pitch_text = "no pitch estimate"
    if pitch is not None:
        pitch_text = f"pitch implies {pitch:.4f} ({section.mpp / pitch - 1:+.1%})"
    tissue = row.get("qc_tissue_fraction_slide")
    on_tissue = row.get("qc_units_on_tissue_fraction")
    extras = [
        f"tissue {tissue:.0%} of slide" if _finite(tissue) else "",
        f"units on tissue {on_tissue:.1%}" if _finite(on_tissue) else "",
    ]
    lines = [
        f"{section.section_id}  ({labels})",
        f"{row['n_pairs']:,} pairs ({dropped:,} of {planned:,} planned dropped off tissue), "
        f"{row['n_units']:,} units, {row['n_genes']:,} genes, median {np.median(counts):,.0f} "
        f"counts/unit",
        f"mpp {section.mpp:.4f} um/px ({row['mpp_source']}), {pitch_text}; "
        + ", ".join(e for e in extras if e),
    ]
    rms, worst = row.get("qc_landmark_rms_um"), row.get("qc_landmark_max_um")
    if _finite(rms) and _finite(worst):  # registration fitted to landmark pairs
        lines.append(
            f"landmark fit: {row.get('qc_landmark_pairs')} pairs, residual rms {rms:.1f} um, "
            f"max {worst:.1f} um"
        )
    return "\n".join(lines)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and bool(np.isfinite(value))


def counts_norm(section: StoredSection) -> LogNorm:
    """Log colour scale over the units' total counts (at least one decade wide)."""
    counts = section.units["total_counts"].to_numpy()
    low = max(1.0, float(counts.min())) if len(counts) else 1.0
    return LogNorm(vmin=low, vmax=max(float(counts.max()) if len(counts) else 10.0, low * 10))


def unit_raster(section: StoredSection, background: Background, values: np.ndarray) -> np.ndarray:
    """`values` painted over the units' true footprints on the background's pixel grid."""
    return paint_units(
        background.image.shape[:2],
        (background.downsample_x, background.downsample_y),
        section.units["x_wsi_px"].to_numpy(),
        section.units["y_wsi_px"].to_numpy(),
        section.unit_size_px,
        str(section.row["unit_shape"]),
        values,
    )


@dataclass(frozen=True)
class UnitLayer:
    """Which unit covers each background pixel, to paint any per-unit values over the slide.

    Computed once per section and shared by every map: each map is then one small blended RGB
    image (`blend_units`), not a slide-sized float raster for matplotlib to colour and resample.
    """

    background: Background
    pixels: UnitPixels  # the background's pixels under units, and which unit

    @classmethod
    def of(cls, section: StoredSection, background: Background) -> UnitLayer:
        """Paint the section's unit numbers on the background's grid."""
        numbers = np.arange(len(section.units), dtype=np.float64)
        return cls(background, UnitPixels.of(unit_raster(section, background, numbers)))

    def over(
        self,
        values: np.ndarray,
        norm: Normalize,
        cmap: str,
        alpha: float,
        side: int,
        base: np.ndarray | None = None,
    ) -> np.ndarray:
        """RGB of `values` (one per unit) coloured and blended over `base` (the slide)."""
        colours = colormaps[cmap](norm(np.asarray(values, np.float64)))
        image = self.background.image if base is None else base
        return blend_units(image, self.pixels, colours, alpha, side)


def _squares(x0: np.ndarray, y0: np.ndarray, side: float) -> np.ndarray:
    corners = np.array([[0.0, 0.0], [side, 0.0], [side, side], [0.0, side]])
    return np.stack([x0, y0], axis=1)[:, None, :] + corners[None, :, :]


def _draw_slide(
    ax: Axes,
    section: StoredSection,
    background: Background,
    mask: TissueMask | None,
    layer: UnitLayer,
    *,
    side: int,
    patches: bool,
) -> ScalarMappable:
    """Draw background, units by counts, tissue contour and patches; return the units' scale."""
    norm = counts_norm(section)
    counts = section.units["total_counts"].to_numpy().clip(1)
    ax.imshow(
        layer.over(counts, norm, CMAP, UNITS_ALPHA, side),
        extent=background.extent,
        interpolation="antialiased",
    )
    if mask is not None and mask.mask.any():
        height, width = mask.mask.shape
        xs = (np.arange(width) + 0.5) * mask.downsample_x
        ys = (np.arange(height) + 0.5) * mask.downsample_y
        ax.contour(
            xs, ys, mask.mask.astype(float), levels=[0.5], colors=TISSUE_COLOUR, linewidths=1.2
        )
    if patches:
        pairs = section.pairs()
        boxes = _squares(pairs["x0"].to_numpy(), pairs["y0"].to_numpy(), section.footprint_px)
        ax.add_collection(
            PolyCollection(
                boxes,
                facecolors="none",
                edgecolors=KEPT_COLOUR,
                linewidths=0.6,
                alpha=0.9,
                rasterized=True,
            )
        )
        dropped = section.dropped_patches()
        if dropped is not None and len(dropped):
            ax.add_collection(
                PolyCollection(
                    _squares(dropped[:, 0], dropped[:, 1], section.footprint_px),
                    facecolors=DROPPED_COLOUR,
                    edgecolors=DROPPED_COLOUR,
                    alpha=0.45,
                    linewidths=0.6,
                )
            )
    left, right, bottom, top = background.extent
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    return ScalarMappable(norm, CMAP)


def overview_figure(
    section: StoredSection,
    background: Background,
    mask: TissueMask | None,
    layer: UnitLayer | None = None,
) -> Figure:
    """Draw the slide with units, tissue contour and patches; QC numbers in the title."""
    height, width = background.image.shape[:2]
    aspect = height / width
    figure = Figure(figsize=(11.0, max(4.0, 9.0 * aspect) + 1.6), dpi=110, layout="constrained")
    ax = figure.add_subplot()
    layer = layer or UnitLayer.of(section, background)
    units = _draw_slide(ax, section, background, mask, layer, side=OVERVIEW_PX, patches=True)
    figure.colorbar(
        units, ax=ax, shrink=0.8, alpha=UNITS_ALPHA, label="total counts per unit (log scale)"
    )
    ax.set_xlabel("x (WSI level-0 px)")
    ax.set_ylabel("y (WSI level-0 px)")
    source = "WSI" if background.source == "wsi" else "stored patches (pass the WSI for the slide)"
    ax.set_title(qc_title(section) + f"\nbackground: {source}", fontsize=10, loc="left")
    dropped = section.dropped_patches()
    planned_drops = int(section.row.get("qc_n_pairs_dropped_tissue") or 0)
    handles = [
        Patch(facecolor="none", edgecolor="grey", label=f"kept patch ({len(section.pairs()):,})")
    ]
    if dropped is not None:
        handles.append(
            Patch(
                facecolor=DROPPED_COLOUR,
                alpha=0.45,
                label=f"dropped, low tissue ({len(dropped):,})",
            )
        )
    elif planned_drops:
        handles.append(
            Patch(
                facecolor="none",
                edgecolor="none",
                label=f"{planned_drops:,} dropped (positions not recorded)",
            )
        )
    if mask is not None:
        handles.append(Line2D([], [], color=TISSUE_COLOUR, label="tissue mask contour"))
    else:
        handles.append(Line2D([], [], color="none", label="tissue contour needs the WSI"))
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.85)
    return figure


def thumbnail_figure(
    section: StoredSection,
    background: Background,
    mask: TissueMask | None,
    layer: UnitLayer | None = None,
) -> Figure:
    """Draw a small picture of the slide with its units, no axes (the report's thumbnail)."""
    height, width = background.image.shape[:2]
    size = THUMBNAIL_PX / 100
    figure = Figure(figsize=(size, size * height / width), dpi=100)
    ax = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    layer = layer or UnitLayer.of(section, background)
    _draw_slide(ax, section, background, mask, layer, side=THUMBNAIL_PX, patches=False)
    ax.set_axis_off()
    return figure
