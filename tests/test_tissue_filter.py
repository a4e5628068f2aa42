"""The tissue filter trusts in-tissue marks on spot platforms; a given threshold still drops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from conftest import fixture_path

from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
from histmol.tissue import pair_assay_flags, tissue_keep

FRACTIONS = np.array([0.0, 0.05, 0.5, 0.09, 1.0])
ASSAY = np.array([True, True, True, False, False])


def test_assay_marked_pairs_are_kept_and_only_flagged() -> None:
    keep, qc = tissue_keep(FRACTIONS, ASSAY, None)
    assert keep.tolist() == [True, True, True, False, True]
    assert qc == {"tissue_filter": "assay", "tissue_min_fraction": 0.1,
                  "n_pairs_below_tissue_fraction": 3, "n_pairs_kept_by_assay": 2,
                  "n_pairs_dropped_tissue": 1, "n_pairs_assay_in_tissue": 3}


def test_a_given_threshold_drops_even_assay_marked_pairs() -> None:
    keep, qc = tissue_keep(FRACTIONS, ASSAY, 0.1)
    assert keep.tolist() == [False, False, True, False, True]
    assert qc["tissue_filter"] == "image (given)" and qc["n_pairs_dropped_tissue"] == 3
    assert qc["n_pairs_kept_by_assay"] == 0


def test_without_assay_marks_the_image_decides_as_before() -> None:
    keep, qc = tissue_keep(FRACTIONS, None, None)
    assert keep.tolist() == (FRACTIONS >= 0.1).tolist()
    assert qc["tissue_filter"] == "image" and "n_pairs_assay_in_tissue" not in qc


def test_pair_flags_follow_the_units_of_each_pair() -> None:
    in_tissue = np.array([1, 0, 0, 1, 1], dtype=np.int8)
    unit_pair = np.array([2, 0, 0, -1, 1])  # unit 3 was not placed in any pair
    assert pair_assay_flags(in_tissue, unit_pair, 3).tolist() == [False, True, True]


def test_mob1_keeps_every_selected_spot_unless_a_threshold_is_given(tmp_path: Path) -> None:
    folder = fixture_path("legacy_st_stutility_MOB1/counts")
    config = BuildConfig(mpp=4.6, target_mpp=5.0, patch_px=64)
    selected = pd.read_csv(folder / "alignment_table_MOB1.tsv", sep="\t")["selected"].sum()
    counts_spots = set(pd.read_csv(folder / "MOB1.tsv", sep="\t", index_col=0,
                                   usecols=[0]).index)
    table = pd.read_csv(folder / "alignment_table_MOB1.tsv", sep="\t")
    in_both = table[(table["selected"] == 1)
                    & (table["x"].astype(str) + "x" + table["y"].astype(str)).isin(counts_spots)]
    assert selected == 379 and len(in_both) == 379  # every selected spot has counts
    request = SectionRequest("st", folder, folder / "MOB1.jpg", "MOB1")  # the cohort's own name
    result = build_section(request, tmp_path / "a", config)
    row = pd.read_parquet(tmp_path / "a" / "sections.parquet").iloc[0]
    assert (row["section_id"], row["section_name"]) == ("mob1", "MOB1")
    assert result.n_pairs == 379 and result.n_units == 379
    assert row["qc_tissue_filter"] == "assay" and row["qc_n_pairs_dropped_tissue"] == 0
    assert row["qc_n_pairs_assay_in_tissue"] == 379
    strict = BuildConfig(mpp=4.6, target_mpp=5.0, patch_px=64, min_tissue_fraction=0.95)
    result = build_section(request, tmp_path / "b", strict)
    row = pd.read_parquet(tmp_path / "b" / "sections.parquet").iloc[0]
    assert row["qc_tissue_filter"] == "image (given)"
    dropped = int(row["qc_n_pairs_dropped_tissue"])
    assert dropped > 0 and result.n_pairs + dropped == 379
