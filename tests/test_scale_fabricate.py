"""The scale-rehearsal generator: a histMol-shaped cohort, real tables, real (shared) parts."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from histmol.data import PairDataset
from histmol.synth.scale import COHORT, HISTMOL_SECTIONS, TISSUES, fabricate, plan_cohort, profile
from histmol.validate import validate_corpus


def test_full_cohort_has_the_histmol_mix_and_size() -> None:
    plans = plan_cohort(HISTMOL_SECTIONS)
    assert len(plans) == 3446
    assert Counter(p.platform for p in plans) == {p.platform: p.sections for p in COHORT}
    assert {p.tissue for p in plans} == set(TISSUES) and len(TISSUES) == 33
    assert {p.species for p in plans} == {"human", "mouse"}
    pairs = sum(p.n_pairs for p in plans)
    units = sum(p.n_pairs * profile(p.platform).units_per_pair for p in plans)
    assert 10e6 <= pairs <= 50e6
    assert 1.6e9 <= units <= 1.9e9
    assert len({p.section_id for p in plans}) == 3446


def test_smaller_cohorts_are_prefixes_and_pair_scale_scales() -> None:
    full = plan_cohort(HISTMOL_SECTIONS, seed=3)
    assert plan_cohort(100, seed=3) == full[:100]
    assert plan_cohort(100, seed=4) != full[:100]
    bigger = plan_cohort(100, seed=3, pair_scale=4.0)
    assert sum(p.n_pairs for p in bigger) > 3.5 * sum(p.n_pairs for p in full[:100])


def test_fabricated_corpus_is_valid_and_its_tables_match_its_files(tmp_path: Path) -> None:
    done = fabricate(tmp_path / "c", 8, pair_scale=0.02, template_dir=tmp_path / "t")
    root = done.root
    manifest = pd.read_parquet(root / "manifest.parquet")
    sections = pd.read_parquet(root / "sections.parquet")
    assert len(sections) == 8 and (sections["status"] == "committed").all()
    assert len(manifest) == done.parts and int(manifest["n_pairs"].sum()) == done.pairs
    assert int(sections["n_units"].sum()) == done.units == int(manifest["n_units"].sum())
    for entry in manifest.itertuples():  # the manifest counts what the files hold
        assert pq.ParquetFile(root / entry.units_path).metadata.num_rows == entry.n_units
    assert validate_corpus(root) == []
    assert validate_corpus(root, workers=2) == []
    # files are shared: every part of the same size links one image template
    images = [root / p / "zarr.json" for p in manifest["images_path"]]
    assert sum(os.stat(p).st_nlink > 1 for p in images) == len(images)
    dataset = PairDataset(root, verify="size")
    assert dataset.epoch_length == done.pairs
    sample = next(iter(dataset))
    assert sample["patch"].shape == (224, 224, 3)


def test_parallel_validate_reports_a_damaged_part(tmp_path: Path) -> None:
    done = fabricate(tmp_path / "c", 3, pair_scale=0.02, template_dir=tmp_path / "t")
    entry = pd.read_parquet(done.root / "manifest.parquet").iloc[-1]
    units = done.root / entry["units_path"]
    data = bytearray(units.read_bytes())
    units.unlink()  # break the hard link: the template and the other sections stay intact
    data[len(data) // 2] ^= 0xFF
    units.write_bytes(bytes(data))
    one, two = validate_corpus(done.root), validate_corpus(done.root, workers=2)
    assert one == two and any(p.path == entry["units_path"] and "sha256" in p.message
                              for p in one)


def test_tables_only_corpus_opens_in_the_loader(tmp_path: Path) -> None:
    done = fabricate(tmp_path / "c", 40, shards="none")
    dataset = PairDataset(done.root)
    assert dataset.epoch_length == done.pairs
    assert len(dataset.parts) == done.parts
    assert not any((done.root / "shards").iterdir())
    with pytest.raises(Exception, match="already exists"):
        fabricate(done.root, 2, shards="none")


def test_sections_table_from_numpy_panels_is_byte_identical_to_lists(tmp_path: Path) -> None:
    import numpy as np

    from histmol.shards.atomic import write_parquet
    from histmol.shards.corpus_tables import section_row, sections_table
    from histmol.synth.scale import section_extras

    rows = []
    for i, plan in enumerate(plan_cohort(12)):
        panel = None if i % 4 == 0 else list(range(i, i + 3 * (i % 3)))
        rows.append(section_row(plan.section_id, {**section_extras(plan, 5), "panel": panel},
                                status="committed", reason=None, n_pairs=plan.n_pairs,
                                n_units=5, n_parts=1))
    as_arrays = [{**r, "panel": None if r["panel"] is None
                  else np.asarray(r["panel"], dtype=np.int32)} for r in rows]
    write_parquet(tmp_path / "lists.parquet", sections_table(rows))
    write_parquet(tmp_path / "arrays.parquet", sections_table(as_arrays))
    assert (tmp_path / "lists.parquet").read_bytes() == (tmp_path / "arrays.parquet").read_bytes()
    table = pq.read_table(tmp_path / "lists.parquet")
    assert table.column("panel").to_pylist() == [r["panel"] for r in
                                                 sorted(rows, key=lambda r: r["section_id"])]
