"""The one definition of a section build: read -> place -> map genes -> write + commit.

Each stage is a plain function with typed input and output (`Section`, `Placement`, `GeneKeys`,
`BuildResult`). `build_section` runs them here, one after another: that is `histmol build`,
`histmol demo` and the library call, with no Prefect at all. The flows (flows/) wrap the same
stages as Prefect tasks (retries on I/O) and only schedule sections. One skip key
(`section_key`: inputs, adapter options, metadata, build config, histmol version) decides on
every path whether a committed section is skipped (`skip_decision`). Every path writes the QC
figures (`commit_stage`). Layer: pipeline (imports core, geometry, adapters, storage; never
flows or the app).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histmol import __version__
from histmol.config import CORPUS_LEVEL_FIELDS, BuildConfig
from histmol.errors import ConfigError, CorpusError, HistmolError, QCError
from histmol.fingerprint import input_fingerprint
from histmol.genes import gene_qc, infer_species
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
from histmol.shards.corpus import COMMITTED, Corpus
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
from histmol.tissue import TissueMask, mask_at, pair_assay_flags, slide_tissue_mask, tissue_keep
from histmol.wsi import SlideReader, open_wsi
from platform_adapters import get_platform, load_reader

if TYPE_CHECKING:
    from histmol.autoregister import AutoPlacement
    from histmol.shards.remote import BuiltSection

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]
FILE_OPTIONS = ("alignment", "counts", "positions", "transform")  # adapter options naming files
BUILD, SKIP, CHANGED = "build", "skip", "changed"  # skip_decision's answers


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

    def local(self, *fields: str) -> SectionRequest:
        """This request with its URL inputs among `fields` (default all) fetched: none here."""
        return self

    def name_urls(self, text: str) -> str:
        """`text` with local copies of URL inputs named by their URL: none here."""
        return text


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

    def summary(self) -> dict[str, Any]:
        """The outcome in a few JSON-ready fields (ingest's per-section record and display)."""
        return {"section_id": self.section_id, "platform": self.platform, "status": self.status,
                "reason": self.reason, "n_pairs": self.n_pairs, "n_units": self.n_units,
                "seconds": self.seconds}


def read_stage(request: SectionRequest, config: BuildConfig) -> Section:
    """Run the platform adapter on the bundle (unknown adapter options are refused by name)."""
    request = request.local()
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
    if request.transform is not None or request.landmarks is not None or config.register == "auto":
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
    figure_dir: Path | None = None,
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
    auto = None
    if config.register == "auto":
        auto = _auto_placement(section, slide, config, transform, landmarks, known_mpp, figure_dir)
        matrix = auto.native_to_wsi
    if fit is not None and known_mpp is not None:  # a bad pair explains more than what follows
        check_residuals(fit, config.max_landmark_residual_um, known_mpp)
    registration = register(
        section, geometry, native_to_wsi=matrix, mpp=config.mpp, mpp_tolerance=config.mpp_tolerance
    )
    if auto is not None:
        registration.qc.update(auto.qc)
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


def _auto_placement(
    section: Section,
    slide: SlideReader,
    config: BuildConfig,
    transform: Path | None,
    landmarks: Path | None,
    known_mpp: float | None,
    figure_dir: Path | None,
) -> AutoPlacement:
    """`register: auto`: the affine from the platform's own image (histmol.auto_placement)."""
    from histmol.auto_placement import place_automatically

    if transform is not None or landmarks is not None:
        raise ConfigError("register auto finds the transform itself: drop the transform or "
                          "landmarks, or build with register given")
    return place_automatically(section, slide, wsi_mpp=known_mpp,
                               min_confidence=config.min_register_confidence,
                               figure_dir=figure_dir)


def tissue_stage(slide: SlideReader, mpp: float, config: BuildConfig) -> TissueMask:
    """Tissue mask from a thumbnail at about `config.tissue_mpp` um/px."""
    return slide_tissue_mask(slide, mpp, config.tissue_mpp)


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


@dataclass
class Placement:
    """The place stage's result: units on the slide, the kept patch plan and its QC."""

    registration: Registration
    plan: PatchPlan
    plan_qc: dict[str, Any]
    pair_tissue: np.ndarray


@dataclass(frozen=True)
class GeneKeys:
    """What gene mapping needs from a read section: its gene table and species (small)."""

    genes: pd.DataFrame
    species: str


def section_key(request: SectionRequest, config: BuildConfig) -> str:
    """The skip key: what decides a section's bytes, hashed.

    Covers the inputs (stat fingerprints of bundle, image, transform or landmarks, and of adapter
    options naming files such as `alignment`/`positions`), the adapter options, the metadata,
    the build config and the histmol version. Option files count by stat and by name only, so a
    moved source tree keeps its key; URL inputs count by their listing (`RemoteInputRequest`),
    so no copy is needed. An input that cannot be stat'ed is a ConfigError naming it.
    """
    sources = getattr(request, "sources", {})
    files = [Path(v) for k, v in sorted(request.options.items()) if k in FILE_OPTIONS
             and k not in sources and isinstance(v, str | Path) and Path(v).exists()]
    options = {k: Path(v).name if k in FILE_OPTIONS and isinstance(v, str | Path)
               else _plain_number(v) for k, v in request.options.items()}
    try:
        inputs = [request.fingerprint(), input_fingerprint(*files)]
    except OSError as err:
        raise ConfigError(f"{err.filename}: cannot read input: {err.strerror or err}") from None
    payload = {
        "histmol": __version__,
        "config": config.fingerprint(),
        "inputs": [*inputs, *(sources[k].fingerprint for k in sorted(request.options)
                              if k in sources)],
        "platform": request.platform,
        "section_id": request.resolved_section_id(),
        "options": options,
        "metadata": {k: v for k, v in request.metadata.items() if v},
    }
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _plain_number(value: Any) -> Any:
    """An integral float as an int: `bin_um=16` (library) and `16.0` (CLI, manifest) agree."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def skip_decision(row: Mapping[str, Any] | None, key: str, *, live: bool, force: bool) -> str:
    """BUILD, SKIP (committed from the same key) or CHANGED (committed from another key).

    `live`: the row's section is readable (committed, its parts all listed). What CHANGED means
    is the caller's: `histmol build` refuses without --force, an ingest rebuilds (the manifest
    says what the section should be).
    """
    if row is None or not live or force:
        return BUILD
    return SKIP if row.get("cache_key") == key else CHANGED


def skipped_result(section_id: str, platform: str, row: Mapping[str, Any]) -> BuildResult:
    """The outcome of a section left as committed."""
    return BuildResult(section_id, platform, "skipped", "unchanged since its last commit",
                       int(row["n_pairs"]), int(row["n_units"]), int(row["n_genes"] or 0))


def place_stage(
    request: SectionRequest, section: Section, config: BuildConfig, *,
    figure_dir: Path | None = None,
) -> Placement:
    """Register, mask tissue and plan patches on one open of the slide (QC failures raise).

    `figure_dir`: where `register: auto` draws its alignment overlay (`auto_figure_dir`).
    """
    request = request.local("wsi", "transform", "landmarks")
    with open_wsi(request.wsi) as slide:
        registration = register_stage(section, slide, config, request.transform,
                                      request.landmarks, figure_dir=figure_dir)
        mask = tissue_stage(slide, registration.mpp, config)
        plan, plan_qc, pair_tissue = plan_stage(section, registration, mask, config)
    return Placement(registration, plan, plan_qc, pair_tissue)


def auto_figure_dir(out: str | Path, section_id: str, config: BuildConfig) -> Path | None:
    """The section's QC folder when registration is automatic (its overlay goes there)."""
    return Path(out) / "qc" / section_id if config.register == "auto" else None


def gene_keys(request: SectionRequest, section: Section) -> GeneKeys:
    """The section's gene table and species (given, else inferred from Ensembl ids)."""
    species = request.metadata.get("species") or infer_species(section.genes) or "unknown"
    return GeneKeys(section.genes[["gene_id", "symbol", "ensembl_id"]].copy(), species)


def map_stage(out: str | Path, config: BuildConfig, keys: GeneKeys) -> np.ndarray:
    """Vocabulary indices of a section's genes, creating the corpus if needed."""
    corpus = Corpus.open(out, create=True, build_config=config.corpus_fields())
    return corpus.map_genes(keys.genes, species=keys.species)


def commit_stage(
    out: str | Path,
    request: SectionRequest,
    section: Section,
    placement: Placement,
    gene_index: np.ndarray,
    species: str,
    config: BuildConfig,
    key: str,
    *,
    force: bool,
    threads: int = 2,
    progress: ProgressCallback | None = None,
) -> BuildResult:
    """Write every kept patch into a staging folder, commit it, then draw the QC figures.

    One function, so the staging folder's owner lock is held by one process from its creation
    to its commit. `force` replaces a committed section.
    """
    started = time.perf_counter()
    section_id = section.section_id
    request = request.local("wsi")
    reg, plan = placement.registration, placement.plan
    # one open of the slide for the whole stage: the patches, the row and the QC figures
    with open_wsi(request.wsi) as slide:
        with Corpus.open(out, build_config=config.corpus_fields()) as corpus:
            staging = corpus.staging_dir(section_id)
            committed = False
            try:
                records, timings = write_stage(
                    staging, section, reg, plan, placement.pair_tissue, gene_index, slide, config,
                    threads=threads, progress=progress,
                )
                qc = {**placement.plan_qc, **reg.qc, **section.qc}
                row = section_row(section, request, reg, plan, config, request.fingerprint(),
                                  species, gene_index, slide, qc)
                row["cache_key"] = key
                corpus.commit_section(section_id, staging, records=records, row=row, force=force)
                committed = True
            finally:
                if not committed:
                    corpus.discard_staging(staging)
        tick = time.perf_counter()
        write_figures(out, section_id, slide)
        timings["qc_figures_s"] = time.perf_counter() - tick
    return BuildResult(
        section_id, request.platform, "committed", "", plan.n_pairs,
        int((plan.unit_pair >= 0).sum()), section.n_genes,
        sum(r.images_bytes + r.units_bytes for r in records), time.perf_counter() - started,
        {k: v for k, v in row.items() if k != "panel"}, timings,
    )


def commit_remote_stage(
    url: str,
    request: SectionRequest,
    section: Section,
    placement: Placement,
    keys: GeneKeys,
    config: BuildConfig,
    key: str,
    *,
    threads: int = 2,
) -> tuple[BuildResult, BuiltSection]:
    """On a machine without the corpus' disk: map genes, build the section locally, upload it.

    The section's genes are mapped (`map_stage`) and it is built by `commit_stage` (the same
    bytes) into a corpus in a private scratch folder (`worker_scratch`, removed afterwards
    whatever happens); only its objects are put (step 2 of histmol/shards/remote.py), with the
    credentials of this process' fsspec config. The caller commits the remote tables from the
    returned rows (`histmol.shards.publish.Publisher.committed`).
    """
    from histmol.shards.remote import RemoteCorpus, worker_scratch  # fsspec: remote builds only

    with worker_scratch(section.section_id) as tmp:
        root = tmp / "corpus"
        gene_index = map_stage(root, config, keys)  # creates the corpus
        result = commit_stage(root, request, section, placement, gene_index, keys.species, config,
                              key, force=True, threads=threads)
        built = RemoteCorpus(url, local=root).upload_section(section.section_id)
    return result, built


def write_figures(out: str | Path, section_id: str, wsi: Path | SlideReader) -> None:
    """QC figures of a committed section under `<out>/qc/<section_id>/` (about 2 s).

    A drawing failure must not undo a good build: it is logged, and `histmol qc` can redo it.
    """
    from histmol.qc.figures import write_section_figures

    try:
        write_section_figures(out, section_id, Path(out) / "qc", slide=wsi)
    except Exception as error:  # noqa: BLE001 - figures are a by-product, never a failure
        log.warning("%s: QC figures not written: %s", section_id, error)


def record_failed(out: str | Path, config: BuildConfig, section_id: str, platform: str,
                  reason: str) -> None:
    """Write a `failed` row with the reason (a committed section keeps its last good data)."""
    corpus = Corpus.open(out, create=True, build_config=config.corpus_fields())
    corpus.record_failure(section_id, {"platform": platform}, reason)


def build_section(
    request: SectionRequest,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    force: bool = False,
    threads: int = 2,
    record_failure: bool = False,
    progress: ProgressCallback | None = None,
) -> BuildResult:
    """Build one section into the corpus at `out` (created if needed), stage by stage, here.

    The one definition of a section build: `histmol build`/`demo` call it as it is, the flows
    wrap the same stages as Prefect tasks. Skips a section committed from the same skip key
    (`section_key`); refuses one committed from another key unless `force`. On error nothing
    is written (or, with `record_failure`, only a failed row in sections.parquet) and the error
    propagates.
    """
    config = config or BuildConfig()
    out = Path(out)
    get_platform(request.platform)
    section_id = request.resolved_section_id()
    started = time.perf_counter()
    try:
        key = section_key(request, config)
        # Open (never create) first: a config clash or an already-built section is known before
        # any work, and a failing build leaves no corpus behind where there was none.
        if (out / "corpus.json").exists():
            corpus = Corpus.open(out, build_config=config.corpus_fields())
            row = corpus.section_status(section_id)
            live = row is not None and row["status"] == COMMITTED
            decision = skip_decision(row, key, live=live, force=force)
            if decision == SKIP:
                assert row is not None
                corpus.compact()  # a killed earlier build may have left its fragment
                return skipped_result(section_id, request.platform, row)
            if decision == CHANGED:
                raise CorpusError(
                    f"{corpus.root}: section {section_id!r} is already in the corpus, built from "
                    "other inputs, adapter options, metadata or config (or another histmol "
                    "version); pass --force to rebuild it"
                )
        section = read_stage(request, config)
        placement = place_stage(request, section, config,
                                figure_dir=auto_figure_dir(out, section_id, config))
        keys = gene_keys(request, section)
        gene_index = map_stage(out, config, keys)
        result = commit_stage(out, request, section, placement, gene_index, keys.species, config,
                              key, force=force, threads=threads, progress=progress)
    except HistmolError as err:
        if record_failure:
            record_failed(out, config, section_id, request.platform,
                          request.name_urls(str(err)))
            Corpus.open(out).compact()
        raise
    Corpus.open(out).compact()  # one section built: its fragment joins the tables
    result.seconds = time.perf_counter() - started
    return result


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
    row.update(gene_qc(section.genes))
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
