"""Platform adapters: one module per ST platform, each with one public `read(bundle, *, ...)`.

This package holds the registry of the 12 platforms histmol knows (`PLATFORMS`), whether an
adapter exists yet, the files each vendor bundle holds, and each platform's default unit
geometry and tiling mode. `histmol platforms` prints this table. Importing it imports no adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from histmol.errors import ConfigError
from histmol.section import Section, TilingMode, UnitShape

__all__ = ["PLATFORMS", "PlatformSpec", "get_platform", "load_reader", "platform_names"]


@dataclass(frozen=True)
class PlatformSpec:
    """One platform: its adapter module, vendor files and default unit geometry.

    `unit_size_um` is the spot diameter (circles) or the default bin side (squares, binned from
    finer native units and overridable); `pitch_um` the centre-to-centre distance of those units.
    """

    name: str
    module: str
    description: str
    expected_files: tuple[str, ...]
    default_mode: TilingMode
    unit_shape: UnitShape
    unit_size_um: float
    pitch_um: float
    implemented: bool = False

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
        implemented=True,
    ),
    PlatformSpec(
        name="visium-hd",
        module="platform_adapters.visium_hd",
        description="10x Genomics Visium HD (Space Ranger >= 3.0), 2 um bins aggregated to 8 um",
        expected_files=(
            "binned_outputs/square_008um/filtered_feature_bc_matrix.h5 (or square_002um, "
            "square_016um)",
            "binned_outputs/square_008um/spatial/tissue_positions.parquet",
            "binned_outputs/square_008um/spatial/scalefactors_json.json (microns_per_pixel, "
            "bin_size_um)",
            "spatial/tissue_hires_image.png, spatial/cytassist_image.tiff",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="xenium",
        module="platform_adapters.xenium",
        description="10x Genomics Xenium in situ; transcripts binned on an 8 um grid",
        expected_files=(
            "experiment.xenium (pixel_size, panel, software version)",
            "transcripts.parquet (x_location, y_location in um; qv; feature_name)",
            "cell_feature_matrix.h5 (or cell_feature_matrix/ MEX)",
            "cells.parquet (or cells.csv.gz)",
            "morphology_focus/ (XOA >= 2.0; morphology_focus.ome.tif / morphology_mip.ome.tif "
            "before)",
            "H&E alignment: *_he_imagealignment.csv (3x3 affine from Xenium Explorer)",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="st",
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
        implemented=True,
    ),
    PlatformSpec(
        name="stereo-seq",
        module="platform_adapters.stereo_seq",
        description="BGI/STOmics Stereo-seq (SAW), 0.5 um DNB pitch binned to bin16 (8 um)",
        expected_files=(
            "*.gem.gz / *.tissue.gem.gz (geneID, x, y, MIDCount[s]; bin1 DNB coordinates)",
            "or *.raw.gef / *.tissue.gef (HDF5)",
            "*_regist.tif (image registered to the chip) or a separate H&E with a transform",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="slide-seq",
        module="platform_adapters.slide_seq",
        description="Slide-seq / Slide-seqV2 (Curio Seeker), 10 um beads",
        expected_files=(
            "bead locations: *BeadLocations*.csv / *_barcode_xy.txt.gz (barcode, xcoord, ycoord)",
            "counts: *MappedDGEForR.csv / *.digital_expression.txt.gz (genes x beads) or "
            "Curio *_anndata.h5ad",
        ),
        default_mode="grid",
        unit_shape="circle",
        unit_size_um=10.0,
        pitch_um=10.0,
    ),
    PlatformSpec(
        name="cosmx",
        module="platform_adapters.cosmx",
        description="NanoString/Bruker CosMx SMI flat files; transcripts binned on an 8 um grid",
        expected_files=(
            "*_exprMat_file.csv (fov, cell_ID, one column per target incl. NegPrb*)",
            "*_metadata_file.csv (fov, cell_ID, CenterX/Y_global_px)",
            "*_fov_positions_file.csv (x_global_px, y_global_px per fov)",
            "*_tx_file.csv (x/y_global_px, target)",
            "CellComposite/ and CellLabels/ images",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="merscope",
        module="platform_adapters.merscope",
        description="Vizgen MERSCOPE; transcripts binned on an 8 um grid",
        expected_files=(
            "cell_by_gene.csv (incl. Blank-* probes)",
            "cell_metadata.csv (center_x, center_y in um)",
            "detected_transcripts.csv (global_x, global_y in um, gene, global_z)",
            "images/micron_to_mosaic_pixel_transform.csv (3x3)",
            "images/mosaic_<stain>_z<i>.tif, cell_boundaries.parquet",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="dbit-seq",
        module="platform_adapters.dbit_seq",
        description="DBiT-seq microfluidic barcoding, 10 um channels (20 um pitch)",
        expected_files=(
            "counts *.h5ad (or a pixels x genes table with AxB barcode ids)",
            "barcode_list* (barcode A/B index to array row/column)",
            "tissue image (e.g. tissue_lowres_image.png) and its alignment",
        ),
        default_mode="spot",
        unit_shape="square",
        unit_size_um=10.0,
        pitch_um=20.0,
    ),
    PlatformSpec(
        name="seq-scope",
        module="platform_adapters.seq_scope",
        description="Seq-Scope (Illumina flow-cell HDMI array, ~0.6 um), binned to 8 um",
        expected_files=(
            "STARsolo Solo.out/GeneFull/raw/{matrix.mtx,barcodes.tsv,features.tsv}",
            "spatial coordinates of HDMI barcodes (barcode, lane, tile, x, y)",
            "H&E image and its transform to tile coordinates",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="hdst",
        module="platform_adapters.hdst",
        description="High-definition ST (Vickovic 2019), 2 um beads binned to 8 um",
        expected_files=(
            "counts table (bead barcode or bead x, y; gene; count), e.g. *_stdata*.tsv",
            "bead position table (barcode, x, y in array units)",
            "H&E image with its alignment to bead coordinates",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
    PlatformSpec(
        name="open-st",
        module="platform_adapters.open_st",
        description="Open-ST (spacemake + openst), 0.6 um capture spots binned to 8 um",
        expected_files=(
            "spacemake/openst *.h5ad (obsm spatial in um; per-tile or stitched puck collection)",
            "H&E image and the openst pairwise alignment (coarse + fine) into it",
        ),
        default_mode="grid",
        unit_shape="square",
        unit_size_um=8.0,
        pitch_um=8.0,
    ),
)

PLATFORMS: dict[str, PlatformSpec] = {spec.name: spec for spec in _SPECS}

Reader = Callable[..., Section]


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


def load_reader(name: str) -> Reader:
    """The `read` function of platform `name`'s adapter (imported on first use)."""
    spec = get_platform(name)
    if not spec.implemented:
        implemented = [s.name for s in _SPECS if s.implemented]
        raise ConfigError(
            f"platform {spec.name} is not implemented yet; implemented: {', '.join(implemented)}"
        )
    module = importlib.import_module(spec.module)
    reader: Reader = module.read
    return reader
