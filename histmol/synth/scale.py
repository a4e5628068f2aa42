"""Fabricate a histMol-shaped corpus cheaply, for scale rehearsals of the tables, loader and tools.

A histMol-sized corpus (3,446 sections from 12 platforms, 33 tissues, human and mouse, ~1.76 B
units, 10-50 M pairs, tens of thousands of parts) cannot be built on one machine, but every cost
that grows with the corpus (table rewrites per commit, loader open and epoch planning, inspect,
report, validate) depends on the tables and the part layout, not on what the patches show. So:

- `plan_cohort` draws the sections: platform mix (`COHORT`), species, tissue, pairs and units per
  pair per platform, seeded. The plan for N sections is the first N rows of one fixed shuffle of
  the full cohort, so curves over 100 / 1,000 / 3,446 sections measure nested corpora.
- `fabricate` writes the corpus with the real table builders (``Corpus.open``, ``map_genes``,
  ``section_row``, ``sections_table``, ``manifest_table``): the vocabulary (human and mouse),
  one row per section with the columns a real build writes, one manifest row per part, parts of
  ``pairs_per_shard`` pairs.
- Part files (``shards="link"``) are real parts written by ``SectionShardWriter`` (flat-grey
  JPEG patches, units with the schema `histmol.pairs` writes and genes from the section's panel)
  once per distinct (platform, species, part index, pairs) into a template folder, then
  hard-linked into every section that has such a part; a fabricated corpus passes
  ``validate_corpus``. Section pair counts are rounded (`PlatformProfile.quantum`) so few distinct
  parts exist. With ``shards="none"`` no file is written under ``shards/``: the tables alone, with
  each part's bytes estimated from ``bytes_per_pair`` (for the benchmarks that read only tables).

Real panels are shared per (platform, species) (one probe set or whole transcriptome per assay),
which is also what lets the parts be shared.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histmol.config import BuildConfig
from histmol.errors import ConfigError
from histmol.gene_reference import reference
from histmol.shards.atomic import (
    PARQUET_COMPRESSION,
    file_digest,
    remove_path,
)
from histmol.shards.commit_record import write_table
from histmol.shards.corpus import MANIFEST, SECTIONS, SHARDS, Corpus
from histmol.shards.corpus_tables import manifest_table, section_row, sections_table
from histmol.shards.shard_writer import (
    PAIR_INDEX,
    ROW_GROUP_UNITS,
    SectionShardWriter,
    ShardRecord,
    part_stem,
)

HISTMOL_SECTIONS = 3446
PAIRS_PER_SHARD = 2048
VOCABULARY = {"human": 36_000, "mouse": 32_000}  # genes per species (GENCODE-sized)
TISSUES = (
    "adrenal", "bladder", "bone", "bone-marrow", "brain", "breast", "cervix", "colon",
    "embryo", "esophagus", "eye", "heart", "kidney", "liver", "lung", "lymph-node", "muscle",
    "ovary", "pancreas", "placenta", "prostate", "skin", "small-intestine", "spinal-cord",
    "spleen", "stomach", "testis", "thymus", "thyroid", "tonsil", "uterus", "whole-body",
    "bowel",
)


@dataclass(frozen=True)
class PlatformProfile:
    """One platform's share of a histMol-like cohort and the shape of its sections.

    `sections` is its count among `HISTMOL_SECTIONS`; `pairs` the median pairs per section (a
    log-normal spread of `spread` around it, rounded to `quantum`); `units_per_pair` the units a
    224 px (112 um) patch holds in the platform's default tiling; `genes_per_unit` the non-zero
    genes stored per unit; `panel` the genes its assay measures; `bytes_per_pair` the stored
    bytes per pair (JPEG + units) used when no part file is written.
    """

    platform: str
    sections: int
    mode: str
    pairs: int
    units_per_pair: int
    genes_per_unit: int
    panel: int
    human_fraction: float
    bytes_per_pair: int
    spread: float = 0.5
    quantum: int = 64


COHORT: tuple[PlatformProfile, ...] = (
    PlatformProfile("visium", 1700, "spot", 3500, 1, 200, 18_000, 0.6, 25_000),
    PlatformProfile("st", 520, "spot", 600, 1, 200, 15_000, 0.7, 25_000),
    PlatformProfile("visium-hd", 180, "grid", 1900, 3136, 3, 18_000, 0.6, 60_000, 0.4, 1024),
    PlatformProfile("xenium", 420, "grid", 9000, 40, 30, 5_000, 0.7, 30_000, 0.5, 512),
    PlatformProfile("stereo-seq", 90, "grid", 8000, 196, 8, 25_000, 0.2, 40_000, 0.4, 512),
    PlatformProfile("slide-seq", 120, "grid", 600, 120, 10, 20_000, 0.3, 35_000),
    PlatformProfile("cosmx", 110, "grid", 3000, 40, 30, 1_000, 0.8, 30_000, 0.5, 512),
    PlatformProfile("merscope", 90, "grid", 8000, 40, 20, 500, 0.4, 30_000, 0.5, 512),
    PlatformProfile("dbit-seq", 60, "spot", 2500, 1, 300, 20_000, 0.2, 25_000),
    PlatformProfile("seq-scope", 30, "grid", 5000, 784, 2, 20_000, 0.3, 60_000, 0.4, 512),
    PlatformProfile("hdst", 40, "grid", 1500, 784, 2, 20_000, 0.4, 60_000, 0.4, 512),
    PlatformProfile("open-st", 86, "grid", 1000, 784, 3, 20_000, 0.7, 60_000, 0.4, 512),
)


@dataclass(frozen=True)
class SectionPlan:
    """One fabricated section."""

    section_id: str
    platform: str
    species: str
    tissue: str
    n_pairs: int


def profile(platform: str) -> PlatformProfile:
    """The `COHORT` profile of `platform`."""
    for item in COHORT:
        if item.platform == platform:
            return item
    raise ConfigError(f"no cohort profile for platform {platform!r}")


def plan_cohort(n_sections: int = HISTMOL_SECTIONS, *, seed: int = 0,
                pair_scale: float = 1.0) -> list[SectionPlan]:
    """The first `n_sections` sections of the seeded histMol-like cohort.

    The cohort is `COHORT` scaled to ``max(n_sections, 3446)`` sections, in one fixed shuffled
    order; `pair_scale` multiplies every section's pairs (e.g. to reach 50 M pairs).
    """
    if isinstance(n_sections, bool) or not isinstance(n_sections, int) or n_sections < 1:
        raise ConfigError(f"n_sections must be an integer >= 1, got {n_sections!r}")
    if not pair_scale > 0:
        raise ConfigError(f"pair_scale must be > 0, got {pair_scale!r}")
    total = sum(p.sections for p in COHORT)
    copies = -(-max(n_sections, total) // total)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    platforms = np.repeat(np.arange(len(COHORT)), [p.sections * copies for p in COHORT])
    platforms = platforms[rng.permutation(len(platforms))][:n_sections]
    plans = []
    for i, index in enumerate(platforms):
        item = COHORT[int(index)]
        draw = np.random.default_rng(np.random.SeedSequence([seed, 2, i]))
        species = "human" if draw.random() < item.human_fraction else "mouse"
        tissue = TISSUES[int(draw.integers(len(TISSUES)))]
        pairs = item.pairs * pair_scale * float(np.exp(draw.normal(0.0, item.spread)))
        n_pairs = max(item.quantum, int(round(pairs / item.quantum)) * item.quantum)
        plans.append(SectionPlan(f"{item.platform}-{i:05d}", item.platform, species, tissue,
                                 n_pairs))
    return plans


def panel_genes(platform: str, species: str) -> pd.DataFrame:
    """The gene table (gene_id, symbol, ensembl_id) a (platform, species) assay measures.

    Genes are drawn from the species' fabricated vocabulary (`_vocabulary_genes`), seeded by the
    pair, so panels of different platforms overlap as real ones do.
    """
    vocabulary = _vocabulary_genes(species)
    seed = int.from_bytes(hashlib.sha256(f"{platform}/{species}".encode()).digest()[:8], "little")
    size = min(profile(platform).panel, len(vocabulary))
    chosen = np.sort(np.random.default_rng(seed).choice(len(vocabulary), size=size,
                                                        replace=False))
    return vocabulary.iloc[chosen].reset_index(drop=True)


@functools.cache
def _vocabulary_genes(species: str) -> pd.DataFrame:
    """The first ``VOCABULARY[species]`` genes of the species in the shipped gene reference.

    Real reference genes, so every fabricated feature resolves as real panels nearly all do
    (random names would fill the unresolved tail, whose 30-bit hash space a cohort of 60,000
    invented names would crowd into collisions).
    """
    genes = reference().genes
    rows = genes[genes["species"] == species].head(VOCABULARY[species])
    return pd.DataFrame({"gene_id": rows["ensembl_id"].to_numpy(object),
                         "symbol": rows["symbol"].to_numpy(object),
                         "ensembl_id": rows["ensembl_id"].to_numpy(object)})


def _part_sizes(n_pairs: int, pairs_per_shard: int) -> list[int]:
    full, rest = divmod(n_pairs, pairs_per_shard)
    return [pairs_per_shard] * full + ([rest] if rest else [])


def units_table(item: PlatformProfile, part: int, n_pairs: int, panel: np.ndarray,
                patch_px: int) -> pa.Table:
    """One part's units with the columns `histmol.pairs` writes, built in whole arrays.

    Each patch holds `item.units_per_pair` units on a square grid; each unit stores
    `item.genes_per_unit` genes of `panel` (spread over it from a random offset) with counts 1-5.
    """
    k, n = item.units_per_pair, n_pairs * item.units_per_pair
    side = int(np.ceil(np.sqrt(k)))
    local = np.tile(np.arange(k), n_pairs)
    pair = np.repeat(np.arange(n_pairs, dtype=np.int32), k)
    x_in = ((local % side) + 0.5) * (patch_px / side)
    y_in = ((local // side) + 0.5) * (patch_px / side)
    x0 = (pair % 64).astype(np.float64) * patch_px
    y0 = (pair // 64).astype(np.float64) * patch_px
    n_genes = min(item.genes_per_unit, len(panel))
    step = max(1, len(panel) // n_genes)
    rng = np.random.default_rng([part, n_pairs, k, len(panel)])
    picks = rng.integers(0, step, size=(n, 1), dtype=np.int64) + np.arange(n_genes) * step
    counts = rng.integers(1, 6, size=(n, n_genes), dtype=np.int32)
    offsets = pa.array(np.arange(0, n * n_genes + 1, n_genes, dtype=np.int32))
    ids = pc.binary_join_element_wise(f"p{part}", pa.array(np.arange(n)).cast(pa.string()), "-")
    return pa.table({
        PAIR_INDEX: pa.array(pair, pa.int32()),
        "unit_id": ids,
        "x_wsi_px": x0 + x_in, "y_wsi_px": y0 + y_in,
        "x_um": (x0 + x_in) * 0.5, "y_um": (y0 + y_in) * 0.5,
        "patch_x0_wsi_px": x0, "patch_y0_wsi_px": y0,
        "x_in_patch_px": x_in.astype(np.float32), "y_in_patch_px": y_in.astype(np.float32),
        "total_counts": counts.sum(axis=1, dtype=np.int64),
        "gene_idx": pa.ListArray.from_arrays(offsets, pa.array(panel[picks].ravel(), pa.int32())),
        "counts": pa.ListArray.from_arrays(offsets, pa.array(counts.ravel())),
    }, schema=pa.schema([pa.field(PAIR_INDEX, pa.int32(), nullable=False)]
                        + [pa.field(name, t) for name, t in _UNIT_TYPES]))


_UNIT_TYPES = (
    ("unit_id", pa.string()), ("x_wsi_px", pa.float64()), ("y_wsi_px", pa.float64()),
    ("x_um", pa.float64()), ("y_um", pa.float64()), ("patch_x0_wsi_px", pa.float64()),
    ("patch_y0_wsi_px", pa.float64()), ("x_in_patch_px", pa.float32()),
    ("y_in_patch_px", pa.float32()), ("total_counts", pa.int64()),
    ("gene_idx", pa.list_(pa.int32())), ("counts", pa.list_(pa.int32())),
)


class _Templates:
    """Real part files written once, then hard-linked into every section that has such a part.

    Image arrays depend only on the pair count (flat-grey patches, written by
    ``SectionShardWriter``); units tables on (platform, species, part index, pairs).
    """

    def __init__(self, folder: Path, patch_px: int, panels: dict[tuple[str, str], np.ndarray]):
        self.folder = folder
        self.patch_px = patch_px
        self.panels = panels
        self.folder.mkdir(parents=True, exist_ok=True)

    def images(self, n_pairs: int) -> tuple[Path, dict[str, Any]]:
        """(zarr folder, its size and sha256) of a part of `n_pairs` flat patches."""
        where = self.folder / f"images-{self.patch_px}-{n_pairs}"
        facts = where / "record.json"
        if not facts.exists():
            remove_path(where)
            patch = np.full((self.patch_px, self.patch_px, 3), 200, dtype=np.uint8)
            one = {"unit_id": ["u"], "gene_idx": [np.zeros(1, np.int32)],
                   "counts": [np.ones(1, np.int32)]}
            with SectionShardWriter(where / "part", patch_px=self.patch_px,
                                    pairs_per_shard=n_pairs) as writer:
                for _ in range(n_pairs):
                    writer.add_pair(patch, one)
            (record,) = writer.records
            _write_json(facts, {"images_bytes": record.images_bytes,
                                "images_sha256": record.images_sha256})
        return where / "part" / f"{part_stem(0)}.zarr", json.loads(facts.read_text())

    def units(self, platform: str, species: str, part: int, n_pairs: int
              ) -> tuple[Path, dict[str, Any]]:
        """(units parquet, its units, size and sha256) of one part."""
        panel = self.panels[(platform, species)]
        where = self.folder / f"units-{platform}-{species}-{len(panel)}-{part}-{n_pairs}"
        facts = where / "record.json"
        if not facts.exists():
            remove_path(where)
            where.mkdir(parents=True)
            table = units_table(profile(platform), part, n_pairs, panel, self.patch_px)
            path = where / "units.parquet"
            pq.write_table(table, path, compression=PARQUET_COMPRESSION,
                           row_group_size=ROW_GROUP_UNITS)
            size, sha = file_digest(path)
            _write_json(facts, {"n_units": table.num_rows, "units_bytes": size,
                                "units_sha256": sha})
        return where / "units.parquet", json.loads(facts.read_text())

    def link_part(self, plan: SectionPlan, part: int, n_pairs: int, section_dir: Path
                  ) -> ShardRecord:
        """Hard-link part `part` of a section into `section_dir`; its manifest record."""
        images, image_facts = self.images(n_pairs)
        units, unit_facts = self.units(plan.platform, plan.species, part, n_pairs)
        _link_tree(images, section_dir / f"{part_stem(part)}.zarr")
        os.link(units, section_dir / f"{part_stem(part)}.parquet")
        return ShardRecord(part=part, images_path=f"{part_stem(part)}.zarr",
                           units_path=f"{part_stem(part)}.parquet", n_pairs=n_pairs,
                           **image_facts, **unit_facts)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(payload))
    os.replace(temp, path)


def _link_tree(source: Path, dest: Path) -> None:
    """Hard-link every file under `source` to the same place under `dest`."""
    for folder, _, files in os.walk(source):
        target = dest / Path(folder).relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(folder) / name, target / name)


def section_extras(plan: SectionPlan, n_units: int) -> dict[str, Any]:
    """The free metadata and QC columns a real build writes for a section (values fabricated)."""
    item = profile(plan.platform)
    draw = np.random.default_rng([int.from_bytes(plan.section_id.encode()[-8:], "little"), 3])
    qc = {f"qc_{name}": float(draw.random()) for name in (
        "barcode_match_rate", "footprint_px", "mpp_embedded", "mpp_embedded_vs_pitch",
        "mpp_estimated_from_pitch", "pitch_px_from_positions", "pitch_um_from_positions",
        "tissue_fraction_slide", "tissue_threshold", "transform_det",
        "units_on_tissue_fraction")}
    qc.update({f"qc_{name}": int(draw.integers(0, 10_000)) for name in (
        "n_control_probes", "n_matched_barcodes", "n_pairs_dropped_tissue", "n_pairs_planned",
        "n_units_dropped_tissue", "n_units_outside_image")})
    dropped = int(draw.integers(0, 40))
    return {
        "platform": plan.platform, "tissue": plan.tissue, "species": plan.species,
        "patient_id": f"patient-{int(draw.integers(0, 1200)):04d}", "adapter": plan.platform,
        "adapter_version": "1", "licence": "CC-BY-4.0", "mpp": 0.25, "mpp_source": "embedded",
        "target_mpp": 0.5, "patch_px": 224, "pitch_um": 100.0, "unit_shape": "square",
        "unit_size_um": 8.0, "qc_mode": item.mode, "qc_transform_mirrored": False,
        "n_units_read": n_units, "wsi_backend": "openslide",
        "wsi_name": f"{plan.section_id}.svs", "wsi_width": 80_000, "wsi_height": 60_000,
        "native_to_wsi": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "dropped_patch_x0_wsi_px": [float(v) for v in draw.random(dropped) * 80_000],
        "dropped_patch_y0_wsi_px": [float(v) for v in draw.random(dropped) * 60_000],
        "config_hash": "fabricated", "input_fingerprint": hashlib.sha256(
            plan.section_id.encode()).hexdigest()[:32],
        "section_options": json.dumps({"mode": item.mode, "pairs_per_shard": PAIRS_PER_SHARD}),
        **qc,
    }


@dataclass(frozen=True)
class Fabricated:
    """What `fabricate` wrote."""

    root: Path
    sections: int
    parts: int
    pairs: int
    units: int
    templates: int


def fabricate(
    out: str | os.PathLike[str],
    n_sections: int = HISTMOL_SECTIONS,
    *,
    seed: int = 0,
    pair_scale: float = 1.0,
    shards: Literal["link", "none"] = "link",
    template_dir: str | os.PathLike[str] | None = None,
    pairs_per_shard: int = PAIRS_PER_SHARD,
    plans: Sequence[SectionPlan] | None = None,
) -> Fabricated:
    """Write a fabricated corpus of `n_sections` sections at `out` (which must not exist).

    `template_dir` (default ``<out>/.fabric``, on the same file system: parts are hard links)
    may be shared by several fabricated corpora. See the module docstring.
    """
    root = Path(out)
    if root.exists():
        raise ConfigError(f"{root}: already exists; fabricate writes a new corpus")
    if shards not in ("link", "none"):
        raise ConfigError(f"shards must be 'link' or 'none', got {shards!r}")
    plans = list(plans) if plans is not None else plan_cohort(n_sections, seed=seed,
                                                                 pair_scale=pair_scale)
    config = BuildConfig()
    corpus = Corpus.open(root, create=True, build_config=config.corpus_fields())
    patch_px = int(config.corpus_fields().get("patch_px", 224))
    panels: dict[tuple[str, str], np.ndarray] = {}
    for species in sorted({p.species for p in plans}):
        corpus.map_genes(_vocabulary_genes(species), species)
    for platform, species in sorted({(p.platform, p.species) for p in plans}):
        panels[(platform, species)] = np.sort(corpus.map_genes(panel_genes(platform, species),
                                                               species))
    templates = _Templates(Path(template_dir) if template_dir is not None
                           else root / ".fabric", patch_px, panels)
    rows, manifest, used = [], [], set()
    n_units_total = 0
    for plan in plans:
        item = profile(plan.platform)
        records = []
        for part, size in enumerate(_part_sizes(plan.n_pairs, pairs_per_shard)):
            if shards == "link":
                record = templates.link_part(plan, part, size, corpus.section_dir(plan.section_id))
                used.add((plan.platform, plan.species, part, size))
            else:
                record = _estimated_record(plan, part, size, item)
            records.append(record)
        n_units = sum(r.n_units for r in records)
        n_units_total += n_units
        panel = panels[(plan.platform, plan.species)]
        rows.append(section_row(
            plan.section_id, {**section_extras(plan, n_units), "n_genes": len(panel),
                              "panel": panel},
            status="committed", reason=None, n_pairs=plan.n_pairs, n_units=n_units,
            n_parts=len(records)))
        manifest.extend(Corpus._manifest_row(plan.section_id, r) for r in records)
    with corpus.lock():  # through the commit record, as every corpus table write
        write_table(root / SECTIONS, sections_table(rows))
        write_table(root / MANIFEST, manifest_table(manifest))  # last: now it is live
    if shards == "none":
        (root / SHARDS).mkdir(exist_ok=True)
    return Fabricated(root, len(plans), len(manifest), sum(p.n_pairs for p in plans),
                      n_units_total, len(used))


def _estimated_record(plan: SectionPlan, part: int, n_pairs: int,
                      item: PlatformProfile) -> ShardRecord:
    """A manifest record for a part that is not written: sizes from the profile."""
    token = hashlib.sha256(f"{plan.section_id}/{part}".encode()).hexdigest()
    unit_bytes = n_pairs * max(item.units_per_pair * 40, 300)
    return ShardRecord(
        part=part, images_path=f"{part_stem(part)}.zarr", units_path=f"{part_stem(part)}.parquet",
        n_pairs=n_pairs, n_units=n_pairs * item.units_per_pair,
        images_bytes=max(n_pairs * item.bytes_per_pair - unit_bytes, n_pairs * 1000),
        units_bytes=unit_bytes, images_sha256=token, units_sha256=token[::-1],
    )
