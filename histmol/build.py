"""Build one section into a corpus: read -> register -> plan -> extract/write -> commit.

Each stage is a plain function with typed input and output so the Prefect flow (flows/) only
wires them, and tests can call any stage alone. `build_section` chains them for one section.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histmol.config import CORPUS_LEVEL_FIELDS, BuildConfig
from histmol.errors import ConfigError, CorpusError, HistmolError, QCError
from histmol.fingerprint import input_fingerprint
from histmol.genes import infer_species
from histmol.landmarks import check_residuals, fit_affine
from histmol.pairs import unit_tables
from histmol.progress import report
from histmol.registration import (
    Registration,
    SlideGeometry,
    read_landmarks_csv,
    read_transform_csv,
    register,
)
from histmol.section import Section, normalise_section_id, slugify
from histmol.shards.corpus import Corpus
from histmol.shards.shard_writer import SectionShardWriter
from histmol.tiling import (
    ExtractionTimes,
    PatchPlan,
    extract_patches,
    footprint_px,
    keep_pairs,
    plan_grid,
    plan_spot,
)
from histmol.tissue import TissueMask, mask_at, pair_assay_flags, tissue_keep, tissue_mask
from histmol.wsi import SlideReader, open_wsi
from platform_adapters import get_platform, load_reader

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SectionRequest:
    """One section to build: which adapter reads which bundle, paired with which image."""

    platform: str
    bundle: Path
    wsi: Path
    section_id: str | None = None
    transform: Path | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    landmarks: Path | None = None

    def resolved_section_id(self) -> str:
        """The given id (lower-cased, validated) or a slug of the bundle's folder name."""
        if self.section_id is not None:
            return normalise_section_id(self.section_id)
        return slugify(self.section_name())

    def section_name(self) -> str:
        """The name as given (id or bundle folder), kept in sections.parquet's section_name."""
        if self.section_id is not None:
            return self.section_id
        return self.bundle.name if self.bundle.name != "outs" else self.bundle.parent.name

    def fingerprint(self) -> str:
        """Stat fingerprint of the bundle, the image and the transform or landmarks file."""
        return input_fingerprint(self.bundle, self.wsi, self.transform, self.landmarks)


@dataclass
class BuildResult:
    """What happened to one section."""

    section_id: str
    platform: str
    status: str  # committed | skipped | failed
    reason: str = ""
    n_pairs: int = 0
    n_units: int = 0
    n_genes: int = 0
    bytes: int = 0
    seconds: float = 0.0
    qc: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def read_stage(request: SectionRequest, config: BuildConfig) -> Section:
    """Run the platform adapter on the bundle (unknown adapter options are refused by name)."""
    read = load_reader(request.platform)
    accepted = {
        name
        for name, parameter in inspect.signature(read).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    } - {"wsi", "section_id", "metadata", "min_match_rate"}
    unknown = sorted(set(request.options) - accepted)
    if unknown:
        raise ConfigError(
            f"platform {request.platform!r} has no option {', '.join(unknown)}; its options are: "
            f"{', '.join(sorted(accepted)) or 'none'}"
        )
    options = dict(request.options)
    if request.transform is not None or request.landmarks is not None:
        # The user places the section: the adapter must not demand its own alignment file. The
        # identity stands in for landmarks until register_stage replaces it with their fit.
        options.setdefault(
            "native_to_wsi",
            read_transform_csv(request.transform) if request.transform is not None else np.eye(3),
        )
    return read(
        request.bundle,
        wsi=request.wsi,
        section_id=request.resolved_section_id(),
        metadata=dict(request.metadata),
        min_match_rate=config.min_match_rate,
        **options,
    )


def register_stage(
    section: Section,
    slide: SlideReader,
    config: BuildConfig,
    transform: Path | None,
    landmarks: Path | None = None,
) -> Registration:
    """Place units on the slide, resolve mpp, and refuse images too coarse for the target.

    The transform comes from a matrix file, or is fitted to landmark pairs (least squares over
    all of them; the worst residual, in um, must stay under the configured limit).
    """
    width, height = slide.dimensions
    geometry = SlideGeometry(
        slide.path, width, height, slide.embedded_mpp, getattr(slide, "mpp_discard_reason", None)
    )
    if transform is not None and landmarks is not None:
        raise ConfigError("give either a transform or landmarks, not both")
    matrix = read_transform_csv(transform) if transform is not None else None
    fit = None
    if landmarks is not None:
        native, wsi = read_landmarks_csv(landmarks)
        fit = fit_affine(native, wsi, allow_mirror=True)  # recorded as qc_transform_mirrored
        matrix = fit.matrix
    known_mpp = config.mpp or slide.embedded_mpp
    if fit is not None and known_mpp is not None:  # a bad pair explains more than what follows
        check_residuals(fit, config.max_landmark_residual_um, known_mpp)
    registration = register(
        section, geometry, native_to_wsi=matrix, mpp=config.mpp, mpp_tolerance=config.mpp_tolerance
    )
    if fit is not None:
        registration.qc["landmark_pairs"] = fit.n_pairs
        registration.qc["landmark_rms_um"] = fit.rms * registration.mpp
        registration.qc["landmark_max_um"] = check_residuals(
            fit, config.max_landmark_residual_um, registration.mpp
        )
    if registration.mpp > config.target_mpp * (1 + config.mpp_tolerance):
        raise QCError(
            f"{slide.path}: the image is too coarse for {config.target_mpp:g} um/px patches: "
            f"it has {registration.mpp:.3f} um/px ({registration.mpp_source}), so every patch "
            f"would be upsampled {registration.mpp / config.target_mpp:.1f}x. Pair the bundle with "
            "the full-resolution H&E, or ask for coarser patches with --target-mpp "
            f"{np.ceil(registration.mpp * 100) / 100:g} or more"
        )
    return registration


def tissue_stage(slide: SlideReader, mpp: float, config: BuildConfig) -> TissueMask:
    """Tissue mask from a thumbnail at about `config.tissue_mpp` um/px."""
    width, height = slide.dimensions
    max_side = int(np.clip(max(width, height) * mpp / config.tissue_mpp, 64, 4096))
    thumbnail, _ = slide.thumbnail(max_side)
    return tissue_mask(
        thumbnail,
        downsample_x=width / thumbnail.shape[1],
        downsample_y=height / thumbnail.shape[0],
    )


def plan_stage(
    section: Section, registration: Registration, mask: TissueMask, config: BuildConfig
) -> tuple[PatchPlan, dict[str, Any], np.ndarray]:
    """Lay out patches for the tiling mode and drop those under the tissue threshold.

    Spot plans of bundles that mark units under tissue keep those (`histmol.tissue.tissue_keep`).

    Returns the kept plan, its QC numbers and the tissue fraction of each kept pair.
    """
    mode = config.mode or section.default_mode
    footprint = footprint_px(config.patch_px, config.target_mpp, registration.mpp)
    planner = plan_spot if mode == "spot" else plan_grid
    plan = planner(registration.x_wsi_px, registration.y_wsi_px, footprint)
    on_tissue = float(mask_at(mask, registration.x_wsi_px, registration.y_wsi_px).mean())
    if on_tissue < config.min_units_on_tissue:
        raise QCError(
            f"section {section.section_id}: only {on_tissue:.0%} of unit centres lie on the tissue "
            f"found in {section.wsi_path} (threshold {config.min_units_on_tissue:.0%}): the "
            "transform is probably wrong (axes swapped, flip missing) or the image is not this "
            "section's"
        )
    fractions = mask.box_fractions(plan.x0, plan.y0, footprint)
    marked = "in_tissue" in section.units.columns and mode == "spot"  # grid: the image decides
    assay = (
        pair_assay_flags(section.units["in_tissue"].to_numpy(), plan.unit_pair, plan.n_pairs)
        if marked
        else None
    )
    keep, tissue_qc = tissue_keep(fractions, assay, config.min_tissue_fraction)
    kept = keep_pairs(plan, keep)
    qc = {
        **tissue_qc,
        "mode": mode,
        "footprint_px": footprint,
        "units_on_tissue_fraction": on_tissue,
        "tissue_fraction_slide": mask.fraction,
        "tissue_threshold": mask.threshold,
        "n_pairs_planned": plan.n_pairs,
        "n_units_dropped_tissue": int(((plan.unit_pair >= 0) & (kept.unit_pair < 0)).sum()),
        # where the dropped patches were, for the QC figures (lists, not scalars)
        "dropped_patch_x0_wsi_px": plan.x0[~keep].tolist(),
        "dropped_patch_y0_wsi_px": plan.y0[~keep].tolist(),
    }
    if kept.n_pairs == 0:
        raise QCError(
            f"section {section.section_id}: all {plan.n_pairs} patches are under the tissue "
            f"fraction threshold {tissue_qc['tissue_min_fraction']:g} (slide tissue fraction "
            f"{mask.fraction:.3f}); check the pairing of bundle and image"
        )
    return kept, qc, fractions[keep]


def write_stage(
    staging: Path,
    section: Section,
    registration: Registration,
    plan: PatchPlan,
    pair_tissue: np.ndarray,
    gene_index: np.ndarray,
    slide: SlideReader,
    config: BuildConfig,
    *,
    threads: int = 2,
    progress: ProgressCallback | None = None,
) -> tuple[list[Any], dict[str, float]]:
    """Extract every kept patch in raster order and write the parts into `staging`."""
    tables = unit_tables(section, registration, plan, pair_tissue, gene_index, config)
    times = ExtractionTimes()
    started = time.perf_counter()
    writer_s = 0.0
    patches = extract_patches(
        slide, plan, config.patch_px, config.resample, threads=threads, times=times
    )
    with SectionShardWriter(
        staging,
        patch_px=config.patch_px,
        pairs_per_shard=config.pairs_per_shard,
        jpeg_quality=config.jpeg_quality,
    ) as writer:
        for index, (patch, units) in enumerate(zip(patches, tables, strict=True)):
            tick = time.perf_counter()
            writer.add_pair(patch, units)
            writer_s += time.perf_counter() - tick
            if progress is not None:
                progress(index + 1, plan.n_pairs)
            elif index % 64 == 63 or index + 1 == plan.n_pairs:
                report(section.section_id, index + 1, plan.n_pairs)
        tick = time.perf_counter()
        records = writer.close()
        writer_s += time.perf_counter() - tick
    timings = {
        "extract_wall_s": time.perf_counter() - started,
        "read_s": times.read_s,
        "resample_s": times.resample_s,
        "encode_write_s": writer_s,
    }
    return records, timings


def build_section(
    request: SectionRequest,
    out: Path,
    config: BuildConfig | None = None,
    *,
    force: bool = False,
    threads: int = 2,
    record_failure: bool = False,
    progress: ProgressCallback | None = None,
) -> BuildResult:
    """Build one section into the corpus at `out` (created if needed).

    Skips a section already committed from the same inputs and config; refuses to replace one
    built differently unless `force`. On error nothing is written (or, with `record_failure`,
    only a failed row in sections.parquet) and the error propagates.
    """
    config = config or BuildConfig()
    get_platform(request.platform)
    section_id = request.resolved_section_id()
    started = time.perf_counter()
    # Open (never create) first: a config clash or an already-built section is known before any
    # work, and a failing build leaves no corpus behind where there was none.
    corpus_fields = config.corpus_fields()
    corpus = (
        Corpus.open(out, build_config=corpus_fields) if (out / "corpus.json").exists() else None
    )
    fingerprint = request.fingerprint()
    if corpus is not None:
        skipped = check_existing(corpus, section_id, request.platform, config, fingerprint, force)
        if skipped is not None:
            return skipped
    staging: Path | None = None
    try:
        section = read_stage(request, config)
        with open_wsi(request.wsi) as slide:
            registration = register_stage(
                section, slide, config, request.transform, request.landmarks
            )
            mask = tissue_stage(slide, registration.mpp, config)
            plan, plan_qc, pair_tissue = plan_stage(section, registration, mask, config)
            species = request.metadata.get("species") or infer_species(section.genes) or "unknown"
            corpus = corpus or Corpus.open(out, create=True, build_config=corpus_fields)
            gene_index = corpus.map_genes(section.genes, species=species)
            staging = corpus.staging_dir(section_id)
            records, timings = write_stage(
                staging,
                section,
                registration,
                plan,
                pair_tissue,
                gene_index,
                slide,
                config,
                threads=threads,
                progress=progress,
            )
            row = section_row(
                section,
                request,
                registration,
                plan,
                config,
                fingerprint,
                species,
                gene_index,
                slide,
                {**plan_qc, **registration.qc, **section.qc},
            )
        corpus.commit_section(section_id, staging, records=records, row=row, force=force)
        staging = None
    except HistmolError as err:
        if record_failure:
            corpus = corpus or Corpus.open(out, create=True, build_config=corpus_fields)
            corpus.record_failure(section_id, {"platform": request.platform}, str(err))
        raise
    finally:
        if staging is not None and corpus is not None:
            corpus.discard_staging(staging)
    n_units = int((plan.unit_pair >= 0).sum())
    return BuildResult(
        section_id,
        request.platform,
        "committed",
        "",
        plan.n_pairs,
        n_units,
        section.n_genes,
        sum(r.images_bytes + r.units_bytes for r in records),
        time.perf_counter() - started,
        {k: v for k, v in row.items() if k != "panel"},
        timings,
    )


def check_existing(
    corpus: Corpus,
    section_id: str,
    platform: str,
    config: BuildConfig,
    fingerprint: str,
    force: bool,
) -> BuildResult | None:
    """A 'skipped' result for an unchanged committed section; an error for a changed one."""
    existing = corpus.section_status(section_id)
    if existing is None or existing.get("status") != "committed" or force:
        return None
    if (
        existing.get("config_hash") == config.fingerprint()
        and existing.get("input_fingerprint") == fingerprint
    ):
        return BuildResult(
            section_id,
            platform,
            "skipped",
            "already committed",
            int(existing["n_pairs"]),
            int(existing["n_units"]),
            int(existing["n_genes"]),
        )
    raise CorpusError(
        f"{corpus.root}: section {section_id!r} is already in the corpus, built from other "
        "inputs or with another config; pass --force to rebuild it"
    )


def section_row(
    section: Section,
    request: SectionRequest,
    registration: Registration,
    plan: PatchPlan,
    config: BuildConfig,
    fingerprint: str,
    species: str,
    gene_index: np.ndarray,
    slide: SlideReader,
    qc: Mapping[str, Any],
) -> dict[str, Any]:
    """The section's row in sections.parquet: identity, provenance, geometry, panel and QC."""
    width, height = slide.dimensions
    row: dict[str, Any] = {
        "platform": section.platform,
        "n_pairs": plan.n_pairs,
        "n_units": int((plan.unit_pair >= 0).sum()),
        "n_units_read": section.n_units,
        "n_genes": section.n_genes,
        "panel": np.sort(gene_index).astype(np.int32).tolist(),
        "config_hash": config.fingerprint(),
        "input_fingerprint": fingerprint,
        "species": species,
        "tissue": request.metadata.get("tissue", ""),
        "patient_id": request.metadata.get("patient_id", ""),
        "licence": request.metadata.get("licence", ""),
        "section_name": request.section_name(),
        "bundle_name": request.bundle.name,
        "wsi_name": request.wsi.name,
        "wsi_width": width,
        "wsi_height": height,
        "wsi_backend": slide.backend,
        "adapter": section.provenance.adapter,
        "adapter_version": section.provenance.adapter_version,
        "bundle_layout": section.provenance.layout,
        "unit_shape": section.unit_shape,
        "unit_size_um": section.unit_size_um,
        "patch_px": config.patch_px,
        "target_mpp": config.target_mpp,
        "native_to_wsi": registration.native_to_wsi.ravel().tolist(),
        "section_options": json.dumps(
            {k: v for k, v in config.to_dict().items() if k not in CORPUS_LEVEL_FIELDS},
            sort_keys=True,
        ),
        # the adapter's default (slide-seq: usually an adjacent H&E) unless the user said otherwise
        "adjacent_section": str(
            request.metadata.get(
                "adjacent_section", section.metadata.get("adjacent_section", "false")
            )
        ).lower()
        == "true",
    }
    for column in section.control_counts.columns:
        row[f"control_{column}_total"] = int(section.control_counts[column].sum())
    row["mpp"] = registration.mpp
    row["mpp_source"] = registration.mpp_source
    row["pitch_um"] = section.pitch_um if section.pitch_um is not None else float("nan")
    for key in ("dropped_patch_x0_wsi_px", "dropped_patch_y0_wsi_px"):
        row[key] = [float(v) for v in qc.get(key, [])]
    for key, value in qc.items():
        if key not in ("mpp", "mpp_source") and isinstance(
            value, (bool, int, float, str, np.generic)
        ):
            row[f"qc_{key}"] = value.item() if isinstance(value, np.generic) else value
    return row
