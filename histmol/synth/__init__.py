"""Synthetic slides and platform bundles with known ground truth, for demos, tests and benchmarks.

A slide is a streamed, seeded pyramidal TIFF whose morphology (background plus tissue regions)
drives expression; each platform writer lays out that platform's native files over the slide and
returns a `GroundTruth` saying where every unit is and what it holds.
"""

from histmol.synth.expression import GroundTruth, gene_panel, region_profiles, simulate_counts
from histmol.synth.morphology import SyntheticSlide, TissueModel, make_slide
from histmol.synth.pyramid import write_pyramidal_tiff, write_pyramidal_tiff_from_array
from histmol.synth.st import write_st_bundle
from histmol.synth.visium import default_native_to_wsi, write_visium_bundle

__all__ = [
    "GroundTruth",
    "SyntheticSlide",
    "TissueModel",
    "default_native_to_wsi",
    "gene_panel",
    "make_slide",
    "region_profiles",
    "simulate_counts",
    "write_pyramidal_tiff",
    "write_pyramidal_tiff_from_array",
    "write_st_bundle",
    "write_visium_bundle",
]
