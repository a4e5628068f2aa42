"""The zoom and metrics figures of a section (see histmol.qc.figures for what each shows)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import EllipseCollection, PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from histmol.qc.measures import (
    MPP_SOURCES,
    Overlay,
    mpp_check,
    neighbour_distances_um,
    nominal_pitch_um,
    zoom_pair,
)
from histmol.qc.section_data import Background, StoredSection
from histmol.shards.shard_reader import ShardReader
from histmol.wsi import SlideReader

MAX_CROP_PX = 2048
PAIR_COLOUR, OTHER_COLOUR, BOX_COLOUR = "#39ff14", "#00e5ff", "#ffd400"
SCALE_BARS_UM = (5, 10, 20, 50, 100, 200, 500, 1000, 2000)
MAP_PX, MAP_GREY = 600, 0xDD  # the genes-detected map: panel px, grey off the units


@dataclass(frozen=True)
class ZoomCrop:
    """A level-0 crop of the WSI around one pair."""

    image: np.ndarray
    x0: int
    y0: int
    pair: int


def read_zoom_crop(section: StoredSection, slide: SlideReader) -> ZoomCrop:
    """Level-0 pixels around the zoom pair: about three patch widths, at most MAX_CROP_PX."""
    pair = zoom_pair(section)
    row = section.pairs().iloc[pair]
    side = int(
        min(
            max(3 * section.footprint_px, section.footprint_px + 4 * section.unit_size_px),
            MAX_CROP_PX,
        )
    )
    half = section.footprint_px / 2
    x0, y0 = round(row["x0"] + half - side / 2), round(row["y0"] + half - side / 2)
    return ZoomCrop(slide.read_region(0, x0, y0, side, side), x0, y0, pair)


def outlines(
    ax: Axes, x: np.ndarray, y: np.ndarray, size: float, shape: str, colour: str, width: float = 1.2
) -> None:
    """Draw unit outlines at true size (`size`: diameter or side, in the axes' data units)."""
    if not len(x):
        return
    if shape == "circle":
        ax.add_collection(
            EllipseCollection(
                np.full(len(x), size),
                np.full(len(x), size),
                np.zeros(len(x)),
                units="xy",
                offsets=np.column_stack([x, y]),
                offset_transform=ax.transData,
                facecolors="none",
                edgecolors=colour,
                linewidths=width,
            )
        )
    else:
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * size / 2
        boxes = np.column_stack([x, y])[:, None, :] + corners[None, :, :]
        ax.add_collection(
            PolyCollection(boxes, facecolors="none", edgecolors=colour, linewidths=width)
        )


def scale_bar(ax: Axes, span_px: float, px_per_um: float, *, x: float, y: float) -> None:
    """Draw a bar of a round number of um, about a fifth of `span_px` long, at (x, y)."""
    target = span_px / px_per_um / 5
    length_um = min(SCALE_BARS_UM, key=lambda v: abs(np.log(v / target)))
    length = length_um * px_per_um
    ax.plot([x, x + length], [y, y], color="white", linewidth=4, solid_capstyle="butt")
    ax.plot([x, x + length], [y, y], color="black", linewidth=1.5, solid_capstyle="butt")
    ax.annotate(
        f"{length_um:g} um",
        (x + length / 2, y),
        xytext=(0, 6),
        textcoords="offset points",
        ha="center",
        color="black",
        fontsize=9,
        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
    )


def draw_zoom(section: StoredSection, crop: ZoomCrop | None) -> Figure:
    """WSI crop with true-size unit outlines (when the WSI is given) beside the stored patch."""
    figure = Figure(figsize=(12.0 if crop is not None else 6.5, 6.6), dpi=110, layout="constrained")
    axes = figure.subplots(1, 2 if crop is not None else 1, squeeze=False)[0]
    pair = crop.pair if crop is not None else zoom_pair(section)
    units = section.units[section.units["pair"] == pair]
    shape = str(section.row["unit_shape"])
    if crop is not None:
        ax = axes[0]
        side = crop.image.shape[0]
        ax.imshow(crop.image, extent=(crop.x0, crop.x0 + side, crop.y0 + side, crop.y0))
        all_units = section.units
        margin = section.unit_size_px
        near = all_units[
            all_units["x_wsi_px"].between(crop.x0 - margin, crop.x0 + side + margin)
            & all_units["y_wsi_px"].between(crop.y0 - margin, crop.y0 + side + margin)
        ]
        others = near[near["pair"] != pair]
        outlines(
            ax,
            others["x_wsi_px"].to_numpy(),
            others["y_wsi_px"].to_numpy(),
            section.unit_size_px,
            shape,
            OTHER_COLOUR,
            1.0,
        )
        outlines(
            ax,
            units["x_wsi_px"].to_numpy(),
            units["y_wsi_px"].to_numpy(),
            section.unit_size_px,
            shape,
            PAIR_COLOUR,
            1.6,
        )
        px0, py0 = units["patch_x0_wsi_px"].iloc[0], units["patch_y0_wsi_px"].iloc[0]
        fp = section.footprint_px
        ax.plot(
            [px0, px0 + fp, px0 + fp, px0, px0],
            [py0, py0, py0 + fp, py0 + fp, py0],
            color=BOX_COLOUR,
            linestyle="--",
            linewidth=1.4,
        )
        ax.set_xlim(crop.x0, crop.x0 + side)
        ax.set_ylim(crop.y0 + side, crop.y0)
        scale_bar(ax, side, 1 / section.mpp, x=crop.x0 + side * 0.05, y=crop.y0 + side * 0.94)
        ax.set_title(
            f"WSI level 0 ({section.mpp:.4f} um/px): units at true size "
            f"({section.row['unit_size_um']:g} um {shape}s); dashed: the patch",
            fontsize=9,
            loc="left",
        )
        ax.set_xlabel("x (WSI level-0 px)")
        ax.set_ylabel("y (WSI level-0 px)")
    ax = axes[-1]
    part = section.parts[section.parts["part"] == units["part"].iloc[0]].iloc[0]
    with ShardReader(section.root / part["images_path"]) as reader:
        patch = reader.read_patch(int(units["pair_index"].iloc[0]))
    patch_px = patch.shape[0]
    target_mpp = float(section.row["target_mpp"])
    ax.imshow(patch, extent=(0, patch_px, patch_px, 0))
    outlines(
        ax,
        units["x_in_patch_px"].to_numpy(),
        units["y_in_patch_px"].to_numpy(),
        float(section.row["unit_size_um"]) / target_mpp,
        shape,
        PAIR_COLOUR,
        1.6,
    )
    ax.set_xlim(0, patch_px)
    ax.set_ylim(patch_px, 0)
    scale_bar(ax, patch_px, 1 / target_mpp, x=patch_px * 0.05, y=patch_px * 0.94)
    ax.set_title(
        f"stored patch: pair {pair}, {len(units)} unit(s), {patch_px} px at {target_mpp:g} um/px",
        fontsize=9,
        loc="left",
    )
    ax.set_xlabel("x in patch (px)")
    figure.suptitle(f"{section.section_id}: full-resolution check of registration", fontsize=11)
    return figure


def draw_metrics(section: StoredSection, background: Background, over: Overlay) -> Figure:
    """Genes-detected map, counts histogram, mpp sources and lattice residuals.

    `over(values, norm, cmap, alpha, side, base)` paints per-unit values (`UnitLayer.over`).
    """
    figure = Figure(figsize=(12.0, 9.0), dpi=100, layout="constrained")
    (ax_map, ax_hist), (ax_mpp, ax_pitch) = figure.subplots(2, 2)
    genes = section.units["n_genes_detected"].to_numpy()
    norm = Normalize(float(genes.min()), float(genes.max())) if len(genes) else Normalize(0, 1)
    grey = np.full_like(background.image, MAP_GREY)
    ax_map.imshow(
        over(genes, norm, "magma", 1.0, MAP_PX, grey),
        extent=background.extent,
        interpolation="antialiased",
    )
    figure.colorbar(
        ScalarMappable(norm, "magma"), ax=ax_map, shrink=0.85, label="genes detected per unit"
    )
    ax_map.set_title("genes detected per unit", fontsize=10, loc="left")
    ax_map.set_xlabel("x (WSI level-0 px)")

    counts = section.units["total_counts"].to_numpy()
    positive = counts[counts > 0]
    if len(positive):
        bins = np.geomspace(positive.min(), max(positive.max(), positive.min() * 1.01), 40)
        ax_hist.hist(positive, bins=bins, color="#4060a0", histtype="stepfilled")
        ax_hist.set_xscale("log")
        ax_hist.axvline(
            np.median(counts),
            color="black",
            linestyle="--",
            label=f"median {np.median(counts):,.0f}",
        )
        ax_hist.legend(fontsize=8)
    ax_hist.set_title(
        f"total counts per unit ({len(counts):,} units, {int((counts == 0).sum()):,} with none)",
        fontsize=10,
        loc="left",
    )
    ax_hist.set_xlabel("total counts")
    ax_hist.set_ylabel("units")
    _mpp_panel(ax_mpp, section)
    _pitch_panel(ax_pitch, section)
    figure.suptitle(f"{section.section_id}: counts and registration checks", fontsize=11)
    return figure


def _mpp_panel(ax: Axes, section: StoredSection) -> None:
    check = mpp_check(section)
    names = [s for s in MPP_SOURCES if s in check.candidates]
    values = np.array([check.candidates[s] for s in names])
    pitch = check.candidates.get("estimated_from_pitch")
    centre = pitch if pitch is not None else check.resolved
    band = (centre * (1 - check.tolerance), centre * (1 + check.tolerance))
    if pitch is not None:
        ax.axvspan(
            *band,
            color="#f4a261",
            alpha=0.3,
            label=f"pitch estimate +-{check.tolerance:.0%} (tolerance)",
        )
    ax.axvline(
        check.resolved,
        color="black",
        linestyle="--",
        label=f"used: {check.resolved:.4f} ({check.source})",
    )
    if not names:
        ax.text(
            0.5,
            0.6,
            f"no embedded, bundle or pitch value recorded:\nmpp set by {check.source}",
            ha="center",
            transform=ax.transAxes,
            bbox={"facecolor": "white", "edgecolor": "none"},
        )
    ax.scatter(
        values,
        range(len(names)),
        s=90,
        zorder=3,
        c=["#2a9d8f" if s == check.source else "#6c757d" for s in names],
    )
    for i, name in enumerate(names):
        off = check.disagreement(name)
        note = f"{values[i]:.4f}" + (f" ({off:+.2%} vs pitch)" if off is not None else "")
        ax.annotate(
            note, (values[i], i), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8
        )
    ax.set_yticks(range(len(names)), [s.replace("_", " ") for s in names])
    ax.set_ylim(-0.6, len(names) - 0.2)
    low = min([band[0] * 0.98, check.resolved, *values])
    high = max([band[1] * 1.02, check.resolved, *values])
    ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("um per level-0 px")
    title = "pixel size: embedded vs bundle scale factors vs unit pitch"
    discarded = section.row.get("qc_mpp_embedded_discarded")
    if discarded:
        title += f"\nembedded value discarded: {discarded}"
    ax.set_title(title, fontsize=10, loc="left")


def _pitch_panel(ax: Axes, section: StoredSection) -> None:
    distances = neighbour_distances_um(section)
    nominal = nominal_pitch_um(section)
    if not len(distances):
        ax.text(
            0.5, 0.5, "fewer than 2 units: no lattice to check", ha="center", transform=ax.transAxes
        )
        return
    median = float(np.median(distances))
    low, high = float(distances.min()), float(distances.max())
    title = f"lattice residuals: neighbour distances, median {median:.2f} um"
    if nominal is not None:
        tolerance = float(section.options.get("mpp_tolerance", 0.05))
        ax.axvspan(
            nominal * (1 - tolerance),
            nominal * (1 + tolerance),
            color="#f4a261",
            alpha=0.3,
            label=f"nominal pitch {nominal:g} um +-{tolerance:.0%}",
        )
        ax.axvline(nominal, color="#e76f51", linewidth=2)
        title += f"\nnominal pitch {nominal:g} um: {median / nominal - 1:+.2%}"
        low, high = (
            min(low, nominal * (1 - 2 * tolerance)),
            max(high, nominal * (1 + 2 * tolerance)),
        )
    else:
        title += "\nno nominal pitch known for this array"
    ax.hist(distances, bins=np.linspace(low, high, 81), color="#6a4c93", histtype="stepfilled")
    ax.axvline(median, color="black", linestyle="--", label=f"median {median:.2f} um")
    ax.legend(fontsize=8)
    ax.set_xlabel("distance to lattice neighbours (um, at the used mpp)")
    ax.set_ylabel("neighbour pairs")
    ax.set_title(title, fontsize=10, loc="left")
