"""histmol: build a corpus of (H&E patch, spatial expression) pairs and train on it.

Start with `histmol demo --out demo/`; `histmol COMMAND --help` shows each command's options and
an example. Add --debug (or set HISTMOL_DEBUG=1) to see the traceback of a failure.
"""

from __future__ import annotations

import json
import numbers
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from histmol import __version__
from histmol.cli_errors import GuardedTyper
from histmol.cli_options import pick, with_options
from histmol.config import BUILD_OPTIONS
from histmol.errors import HistmolError
from histmol.model.config import TRAIN_OPTIONS
from histmol.options import ADAPTER, METADATA, SECTION_FIELDS, THREADS, named, scoped
from histmol.progress import track
from histmol.progress_view import summary_line, task_display

app = GuardedTyper(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
out_console = Console()


@app.callback()
def main_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of a failure.")
    ] = False,
) -> None:
    """Options for every command (give them before the command name)."""
    if debug:
        os.environ["HISTMOL_DEBUG"] = "1"


def quiet_prefect() -> None:
    """Offline-friendly Prefect defaults (no telemetry, warnings only) unless the user set them.

    Prefect's client files go to histmol's own state folder, not the user's ~/.prefect, unless
    PREFECT_HOME is set; the user's Prefect profiles (e.g. an API URL) still apply.
    """
    from flows.server import DEFAULT_HOME_ENV

    if "PREFECT_HOME" not in os.environ:
        profiles = Path.home() / ".prefect" / "profiles.toml"
        if profiles.is_file():
            os.environ.setdefault("PREFECT_PROFILES_PATH", str(profiles))
        cache = os.environ.get("HISTMOL_CACHE_DIR") or str(Path.home() / ".cache" / "histmol")
        home = Path(cache) / "prefect"
        home.mkdir(parents=True, exist_ok=True)  # Prefect's server does not create it
        # marked as histmol's default: a private server still gets a home of its own
        # (flows.server), so two commands at once never share one SQLite database
        os.environ["PREFECT_HOME"] = os.environ[DEFAULT_HOME_ENV] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A first run migrates a fresh database before the temporary server answers: on a busy
    # laptop that takes minutes, well past Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    # histmol reports failures itself, once and without a traceback; PREFECT_LOGGING_LEVEL=INFO
    # brings Prefect's own task-run log lines back.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")


def parse_options(values: list[str]) -> dict[str, Any]:
    """Turn `key=value` adapter options into keyword arguments (numbers and booleans parsed)."""
    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"adapter option {item!r} is not key=value")
        try:
            options[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = raw
    return options


@contextmanager
def progress_display() -> Iterator[None]:
    """A live bar per section fed by histmol.progress."""
    from histmol.progress import reporting

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pairs"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def on_report(section_id: str, done: int, total: int) -> None:
            if section_id not in tasks:
                tasks[section_id] = bar.add_task(section_id, total=total)
            bar.update(tasks[section_id], completed=done, total=total)

        with reporting(on_report):
            yield


def fail(err: Exception) -> None:
    """Print a histmol error without a traceback and exit 1."""
    console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False,
                  soft_wrap=True)  # one line
    raise typer.Exit(1)


@app.command()
@with_options(SECTION_FIELDS, BUILD_OPTIONS, [THREADS])
def build(
    out: Annotated[Path, typer.Option(help="Corpus folder; created, or added to.")],
    force: Annotated[bool, typer.Option(help="Rebuild a section already in the corpus.")] = False,
    **given: Any,
) -> None:
    """Build one section from a platform bundle and its H&E into a corpus.

    Example: histmol build --platform auto --bundle demo/bundles/st-breast-01
    --wsi demo/bundles/st-breast-01/breast01.jpg --out my-corpus/
    """
    from histmol.preflight import check_adapter_options, check_build_inputs

    bundle, wsi, transform, landmarks = (given[k] for k in ("bundle", "wsi", "transform",
                                                             "landmarks"))
    try:
        platform = check_build_inputs(
            given["platform"],
            bundle,
            wsi,
            out,
            files=[
                (transform, "--transform"),
                (landmarks, "--landmarks"),
                (given["alignment"], "--alignment"),
            ],
        )
    except HistmolError as err:
        fail(err)
    if given["platform"].strip().lower() == "auto":
        console.print(f"platform: {platform} (recognised from the bundle's files)", highlight=False)
    from histmol.build import SectionRequest, build_section
    from histmol.config import BuildConfig
    from platform_adapters import get_platform

    metadata = {k: v for k, v in pick(given, scoped(SECTION_FIELDS, METADATA)).items() if v}
    try:
        config = BuildConfig(**pick(given, BUILD_OPTIONS))
        options = {k: v for k, v in pick(given, scoped(SECTION_FIELDS, ADAPTER)).items()
                   if v is not None}
        options.update(parse_options(given["options"] or []))
        check_adapter_options(platform, options)
        request = SectionRequest(
            platform, bundle, wsi, given["section_id"], transform, metadata, options, landmarks
        )
        get_platform(platform)
        request.resolved_section_id()  # refuse an unsafe id before any work starts
        with progress_display():
            result = build_section(request, out, config, force=force,
                                   threads=given["threads"])
    except HistmolError as err:
        fail(err)
    verb = "already in the corpus, skipped" if result.status == "skipped" else "committed"
    out_console.print(
        f"{result.section_id}: {verb}: {result.n_pairs:,} pairs, {result.n_units:,} units, "
        f"{result.n_genes:,} genes"
        + (
            f", {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s"
            if result.status == "committed"
            else ""
        )
    )


@app.command()
def inspect(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Sections, platforms, pairs, units, genes, bytes and QC flags of a corpus.

    Example: histmol inspect demo/corpus --json
    """
    import pandas as pd

    from histmol.summary import summarise

    try:
        summary = summarise(corpus)
    except HistmolError as err:
        fail(err)
    columns = [
        "section_id",
        "platform",
        "status",
        "n_pairs",
        "n_units",
        "n_genes",
        "mpp",
        "mpp_source",
        "bytes",
        "qc_flags",
        "reason",
    ]
    rows = summary.sections.reindex(columns=columns)
    if as_json:
        payload = {
            "corpus": str(corpus),
            "genes": summary.n_genes,
            "totals": summary.totals,
            "sections": json.loads(rows.to_json(orient="records")),
        }
        out_console.print_json(json.dumps(payload))
        return
    table = Table(
        title=f"{corpus}: {summary.totals['sections']} sections, {summary.n_genes:,} genes"
    )
    headers = [
        "section",
        "platform",
        "status",
        "pairs",
        "units",
        "genes",
        "um/px (source)",
        "MB",
        "QC flags / reason",
    ]
    for header in headers:
        table.add_column(
            header,
            overflow="fold",
            justify="right" if header in ("pairs", "units", "genes", "MB") else "left",
        )
    for record in rows.to_dict("records"):
        mpp = "" if pd.isna(record["mpp"]) else f"{record['mpp']:.4g} ({record['mpp_source']})"
        notes = "; ".join(
            str(v) for v in (record["qc_flags"], record["reason"]) if isinstance(v, str) and v
        )
        table.add_row(
            record["section_id"],
            record["platform"],
            record["status"],
            format_cell(record["n_pairs"]),
            format_cell(record["n_units"]),
            format_cell(record["n_genes"]),
            mpp,
            f"{record['bytes'] / 1e6:.1f}",
            notes,
        )
    out_console.print(table)
    totals = summary.totals
    out_console.print(
        f"total: {totals['pairs']:,} pairs, {totals['units']:,} units, {totals['shards']} shards, "
        f"{totals['bytes'] / 1e6:.1f} MB; {totals['failed']} failed"
    )


def format_cell(value: Any) -> str:
    """Render a table cell compactly."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return str(value)


@app.command()
def platforms(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Each platform, its default units and tiling mode, and the files its adapter expects.

    Example: histmol platforms --json
    """
    from platform_adapters import PLATFORMS

    if as_json:
        out_console.print_json(json.dumps([spec.to_dict() for spec in PLATFORMS.values()]))
        return
    table = Table(title="histmol platforms")
    for column in ("platform", "default units (tiling)", "expected files"):
        table.add_column(column, overflow="fold")
    for spec in PLATFORMS.values():
        units = f"{spec.default_units} ({spec.default_mode})"
        table.add_row(spec.name, units, "\n".join(spec.expected_files))
    out_console.print(table)


@app.command()
@with_options([THREADS], own_first=True)
def demo(
    out: Annotated[
        Path, typer.Option(help="Folder for the generated bundles and the corpus.")
    ] = Path("demo"),
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    **given: Any,
) -> None:
    """Generate sample bundles and synthetic slides, build them into a corpus, summarise it.

    Example: histmol demo --out demo/   (then: histmol inspect demo/corpus)
    """
    from histmol.preflight import check_output_folder

    try:
        check_output_folder(out)
    except HistmolError as err:
        fail(err)
    from histmol.demo import run_demo

    try:
        with progress_display():
            corpus = run_demo(out, seed=seed, threads=given["threads"],
                              log=lambda m: console.print(m))
    except HistmolError as err:
        fail(err)
    inspect(corpus, as_json=False)


@app.command()
def version() -> None:
    """Print the histmol version.

    Example: histmol version
    """
    out_console.print(__version__)


@app.command()
def qc(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder.")],
    section: Annotated[
        Optional[list[str]],
        typer.Option(
            metavar="ID", help="Section id (repeatable).", show_default="every committed section"
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder for the figures, one subfolder per section.", show_default="<corpus>/qc"
        ),
    ] = None,
    wsi: Annotated[
        Optional[Path],
        typer.Option(
            help="The section's H&E (with one --section): draws the slide and tissue contour."
        ),
    ] = None,
    genes: Annotated[
        Optional[str],
        typer.Option(
            metavar="GENE,...",
            help="Genes to map in genes.png (symbols or ids, comma-separated).",
            show_default="the section's most variable genes",
        ),
    ] = None,
    n_genes: Annotated[
        int, typer.Option(help="How many most-variable genes to map without --genes.")
    ] = 3,
) -> None:
    """Write each section's QC figures (PNG): overview, zoom, metrics, gene maps, thumbnail.

    Example: histmol qc demo/corpus --section crc-01 --wsi demo/slides/slide-a.tif
    """
    from histmol.qc.figures import write_section_figures
    from histmol.shards.corpus import COMMITTED, Corpus

    try:
        ids = section or [
            s
            for s, status in Corpus.open(corpus)
            .sections()[["section_id", "status"]]
            .itertuples(index=False)
            if status == COMMITTED
        ]
        if wsi is not None and len(ids) != 1:
            raise typer.BadParameter(
                "--wsi needs exactly one --section (the image it was built on)"
            )
        started = time.perf_counter()
        with task_display(console):
            for section_id in track(ids, "qc", unit="sections"):
                paths = write_section_figures(
                    corpus,
                    section_id,
                    out or corpus / "qc",
                    slide=wsi,
                    genes=[g for g in genes.split(",") if g.strip()] if genes else None,
                    n_genes=n_genes,
                )
                out_console.print(
                    f"{section_id}: {', '.join(str(p) for p in paths)}", soft_wrap=True
                )
    except HistmolError as err:
        fail(err)
    folder = out or corpus / "qc"
    console.print(summary_line("wrote figures to", folder, started, f"{len(ids)} sections"))


@app.command()
def report(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder.")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    figures: Annotated[
        Optional[Path],
        typer.Option(help="Where `histmol qc` wrote the figures.", show_default="<corpus>/qc"),
    ] = None,
) -> None:
    """Write one self-contained HTML page about the corpus (no server, no network).

    Example: histmol report demo/corpus --out report.html
    """
    from histmol.qc.report import write_report

    started = time.perf_counter()
    try:
        with task_display(console):
            path = write_report(corpus, out, figures_dir=figures)
    except HistmolError as err:
        fail(err)
    out_console.print(summary_line("wrote", path, started), highlight=False, soft_wrap=True)


@app.command()
def validate(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder.")],
    checksums: Annotated[
        bool, typer.Option(help="Recompute every shard's sha256 (off: sizes only).")
    ] = True,
    workers: Annotated[
        int, typer.Option(min=1, help="Check sections in this many processes.")
    ] = 1,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Check sections on this Dask scheduler (tcp://host:8786); the corpus "
                     "must be at the same path on its workers."),
    ] = None,
) -> None:
    """Check checksums, schemas and references; list every problem and exit 1 if any.

    Example: histmol validate demo/corpus
    """
    from histmol.validate import validate_corpus

    started = time.perf_counter()
    with task_display(console):
        problems = validate_corpus(corpus, checksums=checksums, workers=workers,
                                   dask_address=dask_address)
    for problem in problems:
        out_console.print(str(problem), highlight=False, soft_wrap=True)
    if problems:
        console.print(f"[red]{len(problems)} problem(s)[/red] in {corpus}", highlight=False)
        raise typer.Exit(1)
    seconds = time.perf_counter() - started
    out_console.print(f"{corpus}: no problems found ({seconds:.1f} s)", highlight=False)


@app.command()
def export(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder.")],
    section: Annotated[str, typer.Option(help="Section id.")],
    out: Annotated[
        Path, typer.Option(help="Output: a .zarr store (spatialdata) or .h5ad file (anndata).")
    ],
    fmt: Annotated[str, typer.Option("--format", help="spatialdata or anndata.")] = "spatialdata",
    wsi: Annotated[
        Optional[Path],
        typer.Option(help="The section's H&E.", show_default="a mosaic of the stored patches"),
    ] = None,
    image_mpp: Annotated[
        float, typer.Option(help="um/px of the SpatialData image's finest level.")
    ] = 2.0,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Export one section as SpatialData (zarr) or AnnData (h5ad) for the scverse tools.

    Example: histmol export demo/corpus --section crc-01 --format anndata --out crc-01.h5ad
    """
    from histmol.preflight import check_existing_file, check_output_path

    try:
        check_output_path(out, overwrite=force)
        if wsi is not None:
            check_existing_file(wsi, "WSI (--wsi)")
    except HistmolError as err:
        fail(err)
    from histmol.export import export_section

    started = time.perf_counter()
    try:
        with task_display(console):
            path = export_section(
                corpus, section, out, format=fmt, slide=wsi, image_mpp=image_mpp, overwrite=force
            )
    except HistmolError as err:
        fail(err)
    out_console.print(
        summary_line(f"exported {section} ({fmt}) to", path, started), highlight=False
    )


@app.command()
@with_options([replace(THREADS, default=1)], own_first=True)  # sections side by side: 1 thread each
def ingest(
    manifest: Annotated[
        Path, typer.Argument(help="Manifest (.yaml or .csv): one entry per section.")
    ],
    out: Annotated[
        str,
        typer.Option(help="Corpus folder or fsspec URL (s3://bucket/corpus); created or added to."),
    ],
    dask_address: Annotated[
        Optional[str],
        typer.Option(
            help="Scheduler of a running Dask cluster, e.g. tcp://scheduler:8786 "
            "(needs PREFECT_API_URL)."
        ),
    ] = None,
    max_parallel: Annotated[
        Optional[int],
        typer.Option(
            help="Sections built at once.", show_default="cores / threads; with Dask, its threads"
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild sections even when unchanged.")] = False,
    **given: Any,
) -> None:
    """Build every section of a manifest into one corpus: resumable, failures isolated.

    Example: histmol ingest manifests/demo.yaml --out corpus/
    """
    from histmol.preflight import check_existing_file, check_output_folder

    try:
        check_existing_file(manifest, "manifest")
        check_output_folder(out)
    except HistmolError as err:
        fail(err)
    quiet_prefect()
    from flows.ingest import IngestFailed, run_ingest
    from histmol.ingest_view import ingest_display, outcome_table

    try:
        with ingest_display(console):
            outcomes = run_ingest(manifest, out, dask_address=dask_address,
                                  max_parallel=max_parallel, threads=given["threads"],
                                  force=force)
    except IngestFailed as failed:
        out_console.print(outcome_table(failed.outcomes, f"{manifest} -> {out}"))
        raise typer.Exit(1) from None
    except HistmolError as err:
        fail(err)
    out_console.print(outcome_table(outcomes, f"{manifest} -> {out}"))


@app.command()
def serve(
    name: Annotated[str, typer.Option(help="Deployment name.")] = "default",
) -> None:
    """Serve the ingest-corpus flow for `prefect deployment run 'ingest-corpus/NAME'`.

    Without PREFECT_API_URL a private Prefect server runs as long as this command does.

    Example: histmol serve --name default
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.ingest import ingest_corpus
    from flows.server import prefect_api

    try:
        with prefect_api(ephemeral=False) as url:
            if url is not None:
                console.print(f"a private Prefect server for this command: to run the flow, "
                              f"set PREFECT_API_URL={url} in another shell", highlight=False)
            ingest_corpus.serve(name=name)
    except HistmolError as err:
        fail(err)


@app.command()
@with_options(TRAIN_OPTIONS, own_first=True)
def train(
    corpus: Annotated[list[Path], typer.Argument(metavar="CORPUS...", help="Corpus folder(s).")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoint, metrics, config).")],
    resume: Annotated[bool, typer.Option(help="Continue exactly from --out's checkpoint.")] = False,
    split: Annotated[
        Optional[Path], typer.Option(help="Split file (`histmol split`): train on a fold only.")
    ] = None,
    fold: Annotated[
        Optional[str], typer.Option(help="With --split: a fold number, or all (OUT/fold-<i>).")
    ] = None,
    **given: Any,
) -> None:
    """Train the CLIP-style patch/expression model (multi-GPU: torchrun -m histmol.model.train).

    Example: histmol train corpus/ --out runs/r1 --epochs 10 --batch-size 256
    """
    from histmol.model.config import TrainConfig
    from histmol.model.train import fold_dir, train_folds
    from histmol.model.train import train as train_run

    try:
        config = TrainConfig(**pick(given, TRAIN_OPTIONS))
        started = time.perf_counter()
        with task_display(console):
            corpora = [str(c) for c in corpus]
            if split is None:
                if fold is not None:
                    raise typer.BadParameter("--fold needs --split")
                summary: Any = train_run(corpora, out, config, resume=resume)
            else:
                from histmol.split import read_split

                spec = read_split(split)
                if fold is None:
                    raise typer.BadParameter(
                        f"--split needs --fold: 0..{len(spec.folds) - 1} or all")
                if fold == "all":
                    summary = train_folds(corpora, out, config, spec, resume=resume)
                else:
                    try:
                        index = int(fold)
                    except ValueError:
                        raise typer.BadParameter(
                            f"--fold must be a number or all, got {fold!r}"
                        ) from None
                    summary = train_run(corpora, fold_dir(out, index), config, resume=resume,
                                        split=spec, fold=index)
    except HistmolError as err:
        fail(err)
    out_console.print_json(json.dumps(summary))
    last = summary[-1] if isinstance(summary, list) else summary  # --fold all: one per fold
    state = "finished" if last.get("finished") else "paused (--resume continues)"
    folds = f"{len(summary)} folds, " if isinstance(summary, list) else ""
    console.print(
        summary_line("checkpoint in", out, started, f"{folds}step {last.get('step')}, {state}"),
        highlight=False,
    )


@app.command(name="split")
def split_command(
    corpus: Annotated[list[Path], typer.Argument(help="Corpus folder(s).")],
    out: Annotated[Path, typer.Option(help="The split file to write (JSON).")],
    by: Annotated[
        str, typer.Option(help="Group by patient, section, tissue, platform, or list.")
    ] = "patient",
    folds: Annotated[
        Optional[int],
        typer.Option(help="Number of folds.", show_default="one per group: leave one out"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Orders groups of equal size.")] = 0,
    held_out: Annotated[
        Optional[list[str]],
        typer.Option(help="With --by list: comma-separated held-out sections of one fold "
                     "(repeat per fold)."),
    ] = None,
) -> None:
    """Write a train/test split of the corpus' sections, shared by `train` and `eval`."""
    from histmol.data.source import open_sources
    from histmol.split import make_split, write_split

    try:
        sources = open_sources([str(c) for c in corpus])
        rows = []
        for source in sources:
            pairs: dict[str, int] = {}
            for sid, n in zip(source.manifest.column("section_id").to_pylist(),
                              source.manifest.column("n_pairs").to_pylist(), strict=True):
                pairs[sid] = pairs.get(sid, 0) + int(n)
            rows += [{**row, "n_pairs": pairs[sid]} for sid, row in source.section_rows().items()]
        lists = [[s.strip() for s in item.split(",") if s.strip()] for item in held_out or []]
        spec = make_split(rows, by, folds=folds, seed=seed, held_out=lists or None)
        write_split(spec, out)
    except HistmolError as err:
        fail(err)
    for i in range(len(spec.folds)):
        out_console.print(f"fold {i}: holds out {', '.join(spec.test_sections(i))} "
                          f"({len(spec.train_sections(i))} sections to train on)",
                          highlight=False, soft_wrap=True)
    out_console.print(str(out))


@app.command()
@with_options([replace(named(TRAIN_OPTIONS, "batch_size"), default=128)])
def embed(
    run: Annotated[Path, typer.Argument(help="Run folder (from histmol train).")],
    corpus: Annotated[list[Path], typer.Argument(metavar="CORPUS...", help="Corpus folder(s).")],
    out: Annotated[
        Path, typer.Option(help="Output: .parquet, or .h5ad (AnnData, embeddings in obsm).")
    ],
    **given: Any,
) -> None:
    """Write per-pair image and expression embeddings of a trained run.

    Example: histmol embed runs/r1 corpus/ --out embeddings.parquet
    """
    from histmol.model.embed import embed_corpus

    try:
        started = time.perf_counter()
        with task_display(console):
            path = embed_corpus(run, [str(c) for c in corpus], out,
                                batch_size=given["batch_size"])
    except HistmolError as err:
        fail(err)
    out_console.print(summary_line("wrote embeddings to", path, started), highlight=False)


@app.command(name="eval")
@with_options([named(TRAIN_OPTIONS, "batch_size"), named(TRAIN_OPTIONS, "num_workers")],
              own_first=True)
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder (from histmol train --fold all).")],
    corpus: Annotated[list[Path], typer.Argument(metavar="CORPUS...", help="Corpus folder(s).")],
    split: Annotated[
        Path, typer.Option(help="The split file the folds were trained on (`histmol split`).")
    ],
    genes: Annotated[
        str, typer.Option(help="Target genes: hvg:K (on each fold's training part), all or a list.")
    ] = "hvg:50",
    out: Annotated[
        Optional[Path],
        typer.Option(help="Folder for the result tables.", show_default="RUN/eval"),
    ] = None,
    **given: Any,
) -> None:
    """HEST-Benchmark per fold: frozen embeddings, PCA 256, ridge, per-gene Pearson; baselines.

    Example: histmol eval runs/r1 corpus/ --split split.json --genes hvg:50
    """
    from rich.progress import Progress as Bar

    from histmol.model.evaluate import evaluate_split
    from histmol.split import read_split

    gene_spec: str | list[str] = (
        genes if genes == "all" or genes.startswith(("hvg:", "homolog:")) else genes.split(",")
    )
    started = time.perf_counter()
    try:
        spec = read_split(split)
        with Bar(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
                 TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("embed", total=None)
            tables = evaluate_split(
                run, [str(c) for c in corpus], spec, genes=gene_spec,
                batch_size=given["batch_size"], num_workers=given["num_workers"], out=out,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except HistmolError as err:
        fail(err)
    per_fold, summary = tables["per_fold"], tables["summary"]
    table = Table(title=f"{run} on {', '.join(map(str, corpus))}: {len(spec.folds)} folds "
                  f"held out by {spec.by}")
    for column in ("fold", "held out", "model", "pearson", "mse", "train/test pairs"):
        table.add_column(column)
    for row in per_fold.itertuples(index=False):
        table.add_row(str(row.fold), row.test_groups, row.model, f"{row.pearson_mean:.4f}",
                      f"{row.mse:.4f}", f"{row.n_train_pairs}/{row.n_test_pairs}")
    out_console.print(table)
    for row in summary.itertuples(index=False):
        out_console.print(
            f"{row.model}: pearson {row.pearson_mean:.4f} +- {row.pearson_sd:.4f}, "
            f"mse {row.mse_mean:.4f} +- {row.mse_sd:.4f} over {row.n_folds} folds, "
            f"{row.n_genes} genes", highlight=False)
    console.print(summary_line("wrote per_fold, per_gene and summary tables to",
                               out or run / "eval", started), highlight=False)


@app.command()
def migrate(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder (local).")],
) -> None:
    """Rewrite a corpus of an older gene vocabulary (format 1, or another gene reference)."""
    from histmol.shards.migrate import migrate_corpus

    try:
        stats = migrate_corpus(corpus)
    except HistmolError as err:
        fail(err)
    if not stats["parts"] and not stats["parts_done_before"] and not stats["genes_resolved"] \
            and not stats["genes_unresolved"]:
        out_console.print(f"{corpus}: already current, nothing to migrate")
        return
    out_console.print(
        f"{corpus}: migrated; {stats['parts']} units files rewritten "
        f"({stats['parts_done_before']} done by an earlier run); old genes: "
        f"{stats['genes_resolved']} resolved, {stats['genes_unresolved']} unresolved"
    )


@app.command()
def compact(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder (local).")],
) -> None:
    """Merge the table fragments of recent commits into sections.parquet and manifest.parquet.

    Builds and ingests do this when they end; run it on a corpus a killed ingest left with
    fragments, before reading its tables with plain Parquet tools.

    Example: histmol compact demo/corpus
    """
    from histmol.shards.corpus import Corpus

    try:
        merged = Corpus.open(corpus).compact()
    except HistmolError as err:
        fail(err)
    out_console.print(f"{corpus}: " + ("fragments merged into the tables" if merged
                                       else "no fragments, nothing to merge"),
                      highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point for `python -m histmol`."""
    app(prog_name="histmol")


if __name__ == "__main__":
    sys.exit(main())
