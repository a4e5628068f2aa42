"""Synthetic slides and platform bundles with known ground truth, for demos, tests and benchmarks.

A slide is a streamed, seeded pyramidal TIFF whose morphology (background plus tissue regions)
drives expression; each platform writer lays out that platform's native files over the slide and
returns a `GroundTruth` saying where every unit is and what it holds.
"""

from histmol.synth.cosmx import write_cosmx_bundle
from histmol.synth.dbit_seq import write_dbit_seq_bundle
from histmol.synth.expression import GroundTruth, gene_panel, region_profiles, simulate_counts
from histmol.synth.hdst import write_hdst_bundle
from histmol.synth.merscope import write_merscope_bundle
from histmol.synth.morphology import SyntheticSlide, TissueModel, make_slide
from histmol.synth.open_st import write_open_st_bundle
from histmol.synth.pyramid import write_pyramidal_tiff, write_pyramidal_tiff_from_array
from histmol.synth.seq_scope import write_seq_scope_bundle
from histmol.synth.slide_seq import write_slide_seq_bundle
from histmol.synth.st import write_st_bundle
from histmol.synth.stereo_seq import write_stereo_seq_bundle
from histmol.synth.visium import default_native_to_wsi, write_visium_bundle
from histmol.synth.visium_hd import write_visium_hd_bundle
from histmol.synth.xenium import write_xenium_bundle

__all__ = [
    "GroundTruth",
    "SyntheticSlide",
    "TissueModel",
    "default_native_to_wsi",
    "gene_panel",
    "make_slide",
    "region_profiles",
    "simulate_counts",
    "write_cosmx_bundle",
    "write_dbit_seq_bundle",
    "write_hdst_bundle",
    "write_merscope_bundle",
    "write_open_st_bundle",
    "write_pyramidal_tiff",
    "write_pyramidal_tiff_from_array",
    "write_seq_scope_bundle",
    "write_slide_seq_bundle",
    "write_st_bundle",
    "write_stereo_seq_bundle",
    "write_visium_bundle",
    "write_visium_hd_bundle",
    "write_xenium_bundle",
]
