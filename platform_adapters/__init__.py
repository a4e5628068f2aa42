"""Platform adapters: one module per ST platform, each with one public `read(bundle, *, ...)`.

This package holds the registry of the 12 platforms histmol knows (`PLATFORMS`), whether an
adapter exists yet, the files each vendor bundle holds, and each platform's default unit
geometry and tiling mode. `histmol platforms` prints this table. Importing it imports no adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from histmol.errors import ConfigError

if TYPE_CHECKING:  # annotations only: importing the registry stays light (no pandas, pyarrow)
    from histmol.section import Section, TilingMode, UnitShape

__all__ = [
    "BUILDER_ARGUMENTS",
    "PLATFORMS",
    "PlatformSpec",
    "adapter_options",
    "get_platform",
    "load_reader",
    "platform_names",
]


@dataclass(frozen=True)
class PlatformSpec:
    """One platform: its adapter module, vendor files and default unit geometry.

    `default_units` names what one unit is without `--units`/`--bin-um` (the README's platform
    table says the same). `unit_size_um` is the spot diameter (circles) or the bin side (squares,
    binned from finer native units, the default or `--units bins`); `pitch_um` the
    centre-to-centre distance of those units.
    """

    name: str
    default_units: str
    module: str
    description: str
    expected_files: tuple[str, ...]
    default_mode: TilingMode
    unit_shape: UnitShape
    unit_size_um: float
    pitch_um: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for tables and JSON)."""
        data = asdict(self)
        data["expected_files"] = list(self.expected_files)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlatformSpec:
        """Inverse of `to_dict`."""
        return cls(**{**data, "expected_files": tuple(data["expected_files"])})


_SPECS = (
    PlatformSpec(
        name="visium",
        default_units="55 um spots",
        module="platform_adapters.visium",
        description="10x Genomics Visium (Space Ranger; standard and CytAssist), 55 um spots",
        expected_files=(
            "filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ (MEX; else "
            "raw_feature_bc_matrix[.h5|/] restricted to in-tissue spots)",
            "spatial/tissue_positions.csv (Space Ranger >= 2.0) or "
            "spatial/tissue_positions_list.csv (1.x, no header)",
            "spatial/scalefactors_json.json",
            "spatial/cytassist_image.tiff (CytAssist bundles only)",
        ),
        default_mode="spot",
        unit_shape="circle",
        unit_size_um=55.0,
        pitch_um=100.0,
    ),
    PlatformSpec(
        name="visium-hd",
        default_units="8 um bins",
        module="platform_adapters.visium_hd",
        description="10x Genomics Visium HD (Space Ranger >= 3.0), 8 um bins (any even size "
        "summed from 2 um, or Space Ranger 4 segmented cells)",
        expected_files=(
            "binned_outputs/square_XXXum/filtered_feature_bc_matrix.h5 for the requested bin "
            "size, else the finest folder dividing it (usually square_002um, summed while "
            "streaming)",
            "binned_outputs/square_XXXum/spatial/tissue_positions.parquet (barcode, in_tissue, "
            "array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres)",
            "binned_outputs/square_XXXum/spatial/scalefactors_json.json (bin_size_um, "
            "microns_per_pixel, spot_diameter_fullres)",
            "cells (units=cells): segmented_outputs/filtered_feature_cell_matrix.h5, "
            "cell_segmentations.geojson, spatial/scalefactors_json.json",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="xenium",
        default_units="cells",
        module="platform_adapters.xenium",
        description="10x Genomics Xenium in situ; segmented cells (default) or transcripts "
        "binned on a square grid (units=bins, 8 um)",
        expected_files=(
            "cells: cell_feature_matrix.h5 (or cell_feature_matrix/ MEX) + cells.parquet (or "
            "cells.csv.gz: cell_id, x_centroid, y_centroid, cell_area in um)",
            "bins: transcripts.parquet (or transcripts.csv.gz: feature_name, x_location, "
            "y_location in um, qv)",
            "H&E placement: *he_imagealignment.csv (3x3 H&E px -> morphology px, Xenium "
            "Explorer) or a keypoints CSV (fixedX, fixedY, alignmentX, alignmentY)",
            "experiment.xenium (pixel_size: um per morphology px, to read the alignment)",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="st",
        default_units="100 um spots",
        module="platform_adapters.st",
        description="Legacy Spatial Transcriptomics (Stahl 2016, 1k/2k arrays), 100 um spots",
        expected_files=(
            "count matrix *.tsv[.gz] (ST Pipeline; XxY spot ids, spots as rows or columns)",
            "spot positions: ST Spot Detector *selection*.tsv or STUtility alignment_table*.tsv "
            "(x, y, new_x, new_y, pixel_x, pixel_y[, selected])",
            "H&E image (JPEG) the pixel positions refer to",
        ),
        default_mode="spot",
        unit_shape="circle",
        unit_size_um=100.0,
        pitch_um=200.0,
    ),
    PlatformSpec(
        name="stereo-seq",
        default_units="25 um bins",
        module="platform_adapters.stereo_seq",
        description="BGI/STOmics Stereo-seq (SAW v7/v8), 0.5 um DNBs binned to bin50 (25 um) "
        "by default, or cellbin cells (units=cells)",
        expected_files=(
            "bins: *.tissue.gef / *.gef / *.raw.gef (HDF5 geneExp/bin1) or *.gem[.gz] "
            "(#OffsetX/#OffsetY header; geneID, [geneName,] x, y, MIDCount[s]) anywhere in the "
            "bundle",
            "cells: *.cellbin.gef (cellBin/cell, cellBin/cellExp, cellBin/gene)",
            "*_HE_regist.tif (H&E registered to the chip, one px per DNB); ssDNA/DAPI images "
            "are refused unless allow_fluorescence",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=25.0,
        pitch_um=25.0,
    ),
    PlatformSpec(
        name="slide-seq",
        default_units="10 um beads",
        module="platform_adapters.slide_seq",
        description="Slide-seq / Slide-seqV2 (Curio Seeker), 10 um beads; H&E of an adjacent "
        "section, placed by --landmarks",
        expected_files=(
            "*BeadLocationsForR.csv (barcodes, xcoord, ycoord; puck pixels, 0.65 um each)",
            "*MappedDGEForR.csv or *.digital_expression.txt[.gz] (genes x beads, raw counts)",
            "or Curio Seeker *_anndata.h5ad (raw counts in layers['counts'] or X; "
            "obsm['spatial'] in um)",
        ),
        default_mode="grid",
        unit_shape="circle",
        unit_size_um=10.0,
        pitch_um=10.0,
    ),
    PlatformSpec(
        name="cosmx",
        default_units="cells",
        module="platform_adapters.cosmx",
        description="NanoString/Bruker CosMx SMI flat files (legacy and AtoMx); segmented cells "
        "(default) or transcripts binned on a square grid (units=bins, 8 um)",
        expected_files=(
            "cells: *_exprMat_file.csv[.gz] (fov, cell_ID, one column per target incl. "
            "NegPrb*/Negative*/SystemControl*) + *_metadata_file.csv[.gz] (fov, cell_ID, "
            "CenterX/Y_global_px, CenterX/Y_local_px, Area)",
            "bins: *_tx_file.csv[.gz] (x_global_px, y_global_px, x_local_px, target)",
            "optional: *_fov_positions_file.csv[.gz] (fov|FOV, x_global_px, y_global_px"
            "[, x_global_mm, y_global_mm])",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="merscope",
        default_units="cells",
        module="platform_adapters.merscope",
        description="Vizgen MERSCOPE; segmented cells (default) or detected transcripts binned "
        "on a square grid (units=bins, 8 um)",
        expected_files=(
            "cells: cell_by_gene.csv (cell, genes, Blank-* barcodes) + cell_metadata.csv "
            "(EntityID, fov, volume, center_x, center_y, min/max_x/y in um)",
            "bins: detected_transcripts.csv (global_x, global_y in um, gene)",
            "optional: images/micron_to_mosaic_pixel_transform.csv (3x3 um -> mosaic px; QC)",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="dbit-seq",
        default_units="channel crossings",
        module="platform_adapters.dbit_seq",
        description="DBiT-seq microfluidic barcoding, 10 um channels (20 um pitch)",
        expected_files=(
            "counts: ST Pipeline *_stdata.tsv[.gz] (AxB pixel rows) or *.h5ad (obs = 8-nt "
            "barcode B + 8-nt barcode A) with barcode_list* (A1<TAB>barcode, B1...)",
            "position*.txt (optional; on-tissue AxB pixels from Pixel_identification.m)",
            "corners.csv (spot,x,y: corner pixels in WSI px) or transform= (AxB index -> px)",
        ),
        default_mode="spot",
        unit_shape="square",
        unit_size_um=10.0,
        pitch_um=20.0,
    ),
    PlatformSpec(
        name="seq-scope",
        default_units="8 um bins",
        module="platform_adapters.seq_scope",
        description="Seq-Scope (Illumina flow-cell HDMI array, ~0.6 um), binned to 8 um",
        expected_files=(
            "NovaScope SGE folder (sge/ or the folder itself): barcodes.tsv.gz (barcode, index, "
            "STARsolo index, lane, tile, X, Y in nm, 5 totals)",
            "sge/features.tsv.gz (gene id, symbol, index, 5 totals)",
            "sge/matrix.mtx.gz (MatrixMarket; feature, barcode, Gene, GeneFull, Spliced, "
            "Unspliced, Ambiguous)",
            "transform=: 3x3 affine, SGE coordinates -> H&E level-0 px (or --transform)",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="hdst",
        default_units="8 um bins",
        module="platform_adapters.hdst",
        description="High-definition ST (Vickovic 2019), 2 um beads binned to 8 um",
        expected_files=(
            "*red_ut*.tsv[.gz] (SCP420 long counts: bc XxY, spot_px_x, spot_px_y, gene, count)",
            "*barcodes_under_tissue*.tsv[.gz] (bc, spot_px_x, spot_px_y[, annotation_region])",
            "the H&E the pixels refer to (its mpp, or um_per_px=, sizes the bins)",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="open-st",
        default_units="8 um bins",
        module="platform_adapters.open_st",
        description="Open-ST (spacemake + openst), 0.6 um capture spots binned to 8 um",
        expected_files=(
            "one aligned spacemake/openst *.h5ad (puck collection): X or layers/counts, var "
            "gene names, obsm/spatial (um)",
            "obsm/spatial_pairwise_aligned_fine (else _coarse): (row, col) in aligned image px",
            "uns/spatial_pairwise_aligned/staining_image_transformed (optional; the WSI must be "
            "that image)",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
)

PLATFORMS: dict[str, PlatformSpec] = {spec.name: spec for spec in _SPECS}

Reader = Callable[..., "Section"]


def platform_names() -> tuple[str, ...]:
    """All platform names, in registry order."""
    return tuple(PLATFORMS)


def get_platform(name: str) -> PlatformSpec:
    """The spec of platform `name`; ConfigError listing the valid names otherwise."""
    spec = PLATFORMS.get(str(name).strip().lower())
    if spec is None:
        raise ConfigError(
            f"unknown platform {name!r}; valid platforms: {', '.join(platform_names())}"
        )
    return spec


# Reader keywords the builder fills itself; every other keyword-only one is a user option.
BUILDER_ARGUMENTS = frozenset({"wsi", "section_id", "metadata", "min_match_rate"})


def adapter_options(name: str) -> frozenset[str]:
    """The options (`--option key=value`, `--bin-um`, ...) platform `name`'s reader accepts."""
    import inspect

    return (
        frozenset(
            option
            for option, parameter in inspect.signature(load_reader(name)).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        )
        - BUILDER_ARGUMENTS
    )


def load_reader(name: str) -> Reader:
    """The `read` function of platform `name`'s adapter (imported on first use)."""
    spec = get_platform(name)
    module = importlib.import_module(spec.module)
    reader: Reader = module.read
    return reader
