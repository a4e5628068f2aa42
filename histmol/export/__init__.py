"""Export a committed section to the scverse formats: SpatialData zarr and AnnData h5ad.

The corpus stays the source of truth; an export is a convenience copy for napari-spatialdata,
scanpy, squidpy and friends. ``histmol.export.to_spatialdata`` and ``histmol.export.to_anndata``
document what each file holds; ``histmol.export.table`` builds the shared count table.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from histmol.errors import ConfigError
from histmol.progress import task
from histmol.qc.section_data import (
    Background,
    SlideLike,
    StoredSection,
    load_section,
    matching_slide,
    patch_background,
    wsi_background,
)
from histmol.shards.corpus import Corpus

FORMATS = ("spatialdata", "anndata")
DEFAULT_IMAGE_MPP = 2.0  # um/px of the SpatialData image's finest level (a 5x-like view)


def _background(section: StoredSection, slide: SlideLike | None, factor: float) -> Background:
    with matching_slide(section, slide) as reader:
        if reader is not None:
            return wsi_background(reader, factor)
    # patches are at target_mpp: a mosaic finer than that would only upsample them
    finest = float(section.row["target_mpp"]) / section.mpp
    return patch_background(section, max(factor, finest))


def export_section(
    corpus_root: str | os.PathLike[str],
    section_id: str,
    out: str | os.PathLike[str],
    *,
    format: str,
    slide: SlideLike | None = None,
    image_mpp: float = DEFAULT_IMAGE_MPP,
    overwrite: bool = False,
) -> Path:
    """Write one section as ``spatialdata`` (a .zarr store) or ``anndata`` (an .h5ad file).

    `slide` is the WSI the section was built on (checked by size); without it the image is a
    mosaic of the stored patches. `image_mpp` sets the SpatialData image's resolution; the
    AnnData image is Space Ranger's "hires" size (2000 px on the longer side).
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; one of {', '.join(FORMATS)}")
    if not image_mpp > 0:
        raise ConfigError(f"image_mpp must be positive, got {image_mpp}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; remove it or pass --force")
    with task(f"export {section_id}", total=3, unit="steps") as advance:  # read, image, write
        section = load_section(corpus_root, section_id, counts=True)
        genes = Corpus.open(corpus_root).genes()
        advance()
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        if format == "anndata":
            from histmol.export.to_anndata import HIRES_SIDE, section_anndata, write_anndata

            background = _background(section, slide, max(section.wsi_size) / HIRES_SIDE)
            advance()
            path = write_anndata(section_anndata(section, genes, background), out)
        else:
            from histmol.export.to_spatialdata import section_spatialdata, write_spatialdata

            background = _background(section, slide, image_mpp / section.mpp)
            advance()
            path = write_spatialdata(section_spatialdata(section, genes, background), out)
        advance()
    return path
