"""Check a corpus on disk against its own records and the layout contract (DESIGN.md).

`validate_corpus` reports every problem it finds, not just the first. First the commit record
(``commit.json``: sha256 and size of corpus.json and the three tables, see
`histmol.shards.commit_record`), then checksums and sizes of every shard part (``images_sha256``
covers the shard file then ``zarr.json``, as the writer computes it), the schemas of the corpus
tables and of every units table, referential integrity (each unit points at an existing pair of
its part and at a gene of the vocabulary inside its section's panel; each pair holds a unit;
manifest rows, section rows and files agree), raw counts non-negative, unit centres inside their
patches, and files under ``shards/`` that nothing references. Hidden entries (``.staging-*``,
``.trash-*``, temporary files) belong to builds in progress or to debris that
``Corpus.cleanup_staging`` removes; they are not reported.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histmol.errors import ConfigError, CorpusError
from histmol.parallel_map import parallel_map
from histmol.progress import track
from histmol.section import validate_section_id
from histmol.shards.commit_record import check_local
from histmol.shards.corpus import COMMITTED, FAILED, GENES, MANIFEST, SECTIONS, SHARDS, Corpus
from histmol.shards.corpus_tables import GENES_SCHEMA, MANIFEST_SCHEMA, SECTION_CORE_SCHEMA
from histmol.shards.shard_reader import ShardReader, parse_part_metadata
from histmol.shards.shard_writer import part_stem

UNIT_SCHEMA = {  # required units columns and their types (histmol.pairs writes them)
    "pair_index": pa.int32(),
    "unit_id": pa.string(),
    "x_wsi_px": pa.float64(),
    "y_wsi_px": pa.float64(),
    "x_um": pa.float64(),
    "y_um": pa.float64(),
    "patch_x0_wsi_px": pa.float64(),
    "patch_y0_wsi_px": pa.float64(),
    "x_in_patch_px": pa.float32(),
    "y_in_patch_px": pa.float32(),
    "gene_idx": pa.list_(pa.int32()),
    "counts": pa.list_(pa.int32()),
}
COORDINATES = ("x_wsi_px", "y_wsi_px", "x_um", "y_um", "x_in_patch_px", "y_in_patch_px")
N_EXAMPLES = 3


@dataclass(frozen=True)
class Problem:
    """One problem: the file (relative to the corpus root) and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _examples(values: Iterable[Any]) -> str:
    items = list(values)
    shown = ", ".join(
        repr(v.item() if isinstance(v, np.generic) else v) for v in items[:N_EXAMPLES]
    )
    return shown + (", ..." if len(items) > N_EXAMPLES else "")


def _schema_problems(name: str, table: pa.Table, expected: pa.Schema) -> list[Problem]:
    """Fields of `expected` that `table` lacks or types differently (extra columns are allowed)."""
    problems = []
    for field in expected:
        if field.name not in table.column_names:
            problems.append(Problem(name, f"column {field.name!r} is missing"))
        elif not table.schema.field(field.name).type.equals(field.type):
            got = table.schema.field(field.name).type
            problems.append(Problem(name, f"column {field.name!r} is {got}, expected {field.type}"))
    return problems


def _digest(paths: Iterable[Path]) -> tuple[int, str]:
    """(total size, sha256 of the concatenated bytes) of files, in order."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                size += len(block)
    return size, digest.hexdigest()


class _Validator:
    def __init__(self, corpus: Corpus, checksums: bool) -> None:
        self.corpus = corpus
        self.root = corpus.root
        self.checksums = checksums
        self.problems: list[Problem] = []
        self.n_genes = 0
        self.gene_index = np.zeros(0, dtype=np.int64)

    def add(self, path: str | Path, message: str) -> None:
        path = Path(path)
        relative = path.relative_to(self.root) if path.is_absolute() else path
        self.problems.append(Problem(relative.as_posix(), message))

    def table(self, name: str, file_name: str, schema: pa.Schema) -> pa.Table | None:
        try:
            table = self.corpus.read_table(name)  # type: ignore[arg-type]
        except CorpusError as error:
            self.add(file_name, str(error).removeprefix(f"{self.root / file_name}: "))
            return None
        if not (self.root / file_name).exists():
            self.add(file_name, "missing")
        self.problems.extend(_schema_problems(file_name, table, schema))
        return table

    # ------------------------------------------------------------------ corpus tables
    def genes(self, table: pa.Table) -> None:
        index = table.column("index").to_numpy(zero_copy_only=False).astype(np.int64)
        self.n_genes = len(index)
        self.gene_index = index  # stable indices (histmol.gene_reference), sorted
        if len(index) and np.any(np.diff(index) <= 0):
            self.add(GENES, "index is not strictly increasing")
        keys = list(
            zip(
                table.column("gene_id").to_pylist(),
                table.column("species").to_pylist(),
                strict=True,
            )
        )
        twice = sorted(k for k, n in Counter(keys).items() if n > 1)
        if twice:
            self.add(GENES, f"(gene_id, species) keys repeat: {_examples(twice)}")

    def sections(self, rows: list[dict[str, Any]], manifest: list[dict[str, Any]]) -> None:
        repeated = sorted(i for i, n in Counter(r["section_id"] for r in rows).items() if n > 1)
        if repeated:
            self.add(SECTIONS, f"section ids repeat: {_examples(repeated)}")
        listed = {m["section_id"] for m in manifest}
        for row in rows:
            sid = row["section_id"]
            try:
                validate_section_id(sid)
            except ConfigError as error:
                self.add(SECTIONS, str(error))
                continue
            if row["status"] not in (COMMITTED, FAILED):
                self.add(SECTIONS, f"section {sid!r} has status {row['status']!r}")
            if row["status"] == FAILED:
                if not row.get("reason"):
                    self.add(SECTIONS, f"failed section {sid!r} records no reason")
                if sid in listed:
                    self.add(MANIFEST, f"failed section {sid!r} has manifest rows")
            if row["status"] != COMMITTED:
                continue
            panel = np.asarray(row.get("panel") or [], dtype=np.int64)
            if not len(panel):
                self.add(SECTIONS, f"section {sid!r} has an empty gene panel")
            elif not np.isin(panel, self.gene_index).all():
                bad = panel[~np.isin(panel, self.gene_index)]
                self.add(
                    SECTIONS,
                    f"section {sid!r}: panel indices not in {GENES}: {_examples(bad)}",
                )
            if len(np.unique(panel)) != len(panel):
                self.add(SECTIONS, f"section {sid!r}: panel lists a gene twice")
            if row.get("n_genes") is not None and row["n_genes"] != len(panel):
                self.add(
                    SECTIONS,
                    f"section {sid!r}: n_genes {row['n_genes']} but the panel "
                    f"holds {len(panel)} genes",
                )
            parts = sorted(m["part"] for m in manifest if m["section_id"] == sid)
            if parts != list(range(row.get("n_parts") or 0)):
                self.add(
                    MANIFEST,
                    f"section {sid!r}: parts {parts}, sections.parquet says "
                    f"n_parts {row.get('n_parts')}",
                )
            for key in ("n_pairs", "n_units"):
                total = sum(int(m[key]) for m in manifest if m["section_id"] == sid)
                if row.get(key) != total:
                    self.add(
                        SECTIONS,
                        f"section {sid!r}: {key} {row.get(key)} but its manifest "
                        f"rows sum to {total}",
                    )

    # ------------------------------------------------------------------ parts
    def part(
        self, entry: dict[str, Any], row: dict[str, Any] | None, seen_ids: list[pa.Array]
    ) -> None:
        sid, part = entry["section_id"], entry["part"]
        for key, suffix in (("images_path", ".zarr"), ("units_path", ".parquet")):
            expected = f"{SHARDS}/{sid}/{part_stem(part)}{suffix}"
            if entry[key] != expected:
                self.add(
                    MANIFEST,
                    f"section {sid!r} part {part}: {key} {entry[key]!r}, expected {expected!r}",
                )
        if row is None or row["status"] != COMMITTED:
            self.add(MANIFEST, f"section {sid!r} part {part}: no committed row in {SECTIONS}")
        n_pairs = self.images(entry)
        self.units(entry, row, n_pairs, seen_ids)

    def images(self, entry: dict[str, Any]) -> int | None:
        """Check one part's image array; return its number of pairs when it can be read."""
        path = self.root / entry["images_path"]
        if not path.is_dir():
            self.add(path, "missing (listed in the manifest)")
            return None
        try:
            facts = parse_part_metadata(path)
            with ShardReader(path):  # checks the shard index: CRC-32C, bounds, truncation
                pass
        except CorpusError as error:
            self.add(path, str(error))
            return None
        files = [path / facts["shard_key"], path / "zarr.json"]
        size, sha = (
            _digest(files) if self.checksums else (sum(f.stat().st_size for f in files), None)
        )
        if size != entry["images_bytes"]:
            self.add(path, f"{size} bytes, the manifest says {entry['images_bytes']}")
        if sha is not None and sha != entry["images_sha256"]:
            self.add(path, f"sha256 {sha} differs from the manifest's {entry['images_sha256']}")
        n_pairs, patch_px = facts["shape"][0], facts["patch_px"]
        if n_pairs != entry["n_pairs"]:
            self.add(path, f"holds {n_pairs} patches, the manifest says {entry['n_pairs']}")
        expected_px = self.corpus.build_config.get("patch_px")
        if expected_px is not None and patch_px != expected_px:
            self.add(path, f"patches are {patch_px} px, corpus.json says {expected_px}")
        stray = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and p not in files
        )
        if stray:
            self.add(path, f"unexpected files {_examples(stray)}")
        return int(n_pairs)

    def units(
        self,
        entry: dict[str, Any],
        row: dict[str, Any] | None,
        n_pairs: int | None,
        seen_ids: list[pa.Array],
    ) -> None:
        path = self.root / entry["units_path"]
        if not path.is_file():
            self.add(path, "missing (listed in the manifest)")
            return
        size, sha = _digest([path]) if self.checksums else (path.stat().st_size, None)
        if size != entry["units_bytes"]:
            self.add(path, f"{size} bytes, the manifest says {entry['units_bytes']}")
        if sha is not None and sha != entry["units_sha256"]:
            self.add(path, f"sha256 {sha} differs from the manifest's {entry['units_sha256']}")
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as error:
            self.add(path, f"unreadable ({error})")
            return
        schema_problems = _schema_problems(entry["units_path"], table, pa.schema(UNIT_SCHEMA))
        self.problems.extend(schema_problems)
        if table.num_rows != entry["n_units"]:
            self.add(path, f"holds {table.num_rows} units, the manifest says {entry['n_units']}")
        if schema_problems:
            return
        pair = table.column("pair_index").to_numpy()
        if n_pairs is not None:
            bad = (pair < 0) | (pair >= n_pairs)
            if bad.any():
                self.add(
                    path,
                    f"{int(bad.sum())} units point at pairs outside 0..{n_pairs - 1}: "
                    f"{_examples(np.unique(pair[bad]))}",
                )
            empty = np.setdiff1d(np.arange(n_pairs), pair)
            if len(empty):
                self.add(path, f"{len(empty)} pairs hold no unit: {_examples(empty)}")
        ids = table.column("unit_id")
        if ids.null_count:
            self.add(path, f"{ids.null_count} units have no unit_id")
        ids = pc.drop_null(ids).combine_chunks()
        unique = pc.unique(ids)
        earlier = pa.concat_arrays(seen_ids) if seen_ids else pa.array([], pa.string())
        if len(unique) != len(ids) or pc.any(pc.is_in(unique, value_set=earlier)).as_py():
            # only now, with a repeat known, are the ids turned into Python strings
            before = set(earlier.to_pylist())
            repeated = {v for v, n in Counter(ids.to_pylist()).items() if n > 1 or v in before}
            self.add(path, f"unit ids repeat within the section: {_examples(sorted(repeated))}")
        seen_ids.append(unique)
        for column in COORDINATES:
            finite = np.isfinite(table.column(column).to_numpy(zero_copy_only=False))
            if not finite.all():
                self.add(path, f"{int((~finite).sum())} units have a non-finite {column}")
        self.expression(path, table, row)
        self.inside_patch(path, table)

    def expression(self, path: Path, table: pa.Table, row: dict[str, Any] | None) -> None:
        genes, counts = table.column("gene_idx"), table.column("counts")
        lengths = pc.list_value_length(genes).to_numpy(zero_copy_only=False)
        if not np.array_equal(lengths, pc.list_value_length(counts).to_numpy(zero_copy_only=False)):
            self.add(path, "gene_idx and counts lists differ in length for some units")
            return
        values = pc.list_flatten(genes).to_numpy(zero_copy_only=False).astype(np.int64)
        numbers = pc.list_flatten(counts).to_numpy(zero_copy_only=False)
        if (numbers < 0).any():
            self.add(
                path,
                f"{int((numbers < 0).sum())} negative counts: "
                f"{_examples(np.unique(numbers[numbers < 0]))}",
            )
        outside = ~np.isin(values, self.gene_index)
        if outside.any():
            self.add(
                path,
                f"{int(outside.sum())} counts reference genes not in {GENES}: "
                f"{_examples(np.unique(values[outside]))}",
            )
        if row is not None and row.get("panel") is not None:
            off_panel = np.setdiff1d(values[~outside], np.asarray(row["panel"], dtype=np.int64))
            if len(off_panel):
                self.add(
                    path,
                    f"{len(off_panel)} genes with counts are not in section "
                    f"{row['section_id']!r}'s panel: {_examples(off_panel)}",
                )
        if "total_counts" in table.column_names:
            offsets = counts.combine_chunks().offsets.to_numpy()
            running = np.concatenate([[0], np.cumsum(numbers, dtype=np.int64)])
            sums = running[offsets[1:] - offsets[0]] - running[offsets[:-1] - offsets[0]]
            stored = table.column("total_counts").to_numpy(zero_copy_only=False)
            if not np.array_equal(stored, sums):
                self.add(
                    path,
                    f"{int((stored != sums).sum())} units' total_counts differ from "
                    "the sum of their counts",
                )

    def inside_patch(self, path: Path, table: pa.Table) -> None:
        patch_px = self.corpus.build_config.get("patch_px")
        if patch_px is None:
            return
        x = table.column("x_in_patch_px").to_numpy(zero_copy_only=False)
        y = table.column("y_in_patch_px").to_numpy(zero_copy_only=False)
        tolerance = 1e-3 * patch_px
        outside = (
            (x < -tolerance)
            | (y < -tolerance)
            | (x > patch_px + tolerance)
            | (y > patch_px + tolerance)
        )
        if outside.any():
            self.add(
                path,
                f"{int(outside.sum())} unit centres lie outside their {patch_px} px "
                "patch (x_in_patch_px / y_in_patch_px)",
            )

    def stray(self, manifest: list[dict[str, Any]]) -> None:
        shards = self.root / SHARDS
        if not shards.is_dir():
            if manifest:
                self.add(SHARDS, "missing")
            return
        listed = {m["images_path"] for m in manifest} | {m["units_path"] for m in manifest}
        sections = {m["section_id"] for m in manifest}
        for entry in sorted(shards.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.name not in sections:
                self.add(entry, "not referenced by the manifest")
                continue
            for item in sorted(entry.iterdir()):
                if (
                    not item.name.startswith(".")
                    and item.relative_to(self.root).as_posix() not in listed
                ):
                    self.add(item, "not referenced by the manifest")


def validate_corpus(
    root: str | os.PathLike[str],
    *,
    checksums: bool = True,
    workers: int = 1,
    dask_address: str | None = None,
) -> list[Problem]:
    """Every problem found in the corpus at `root` (empty when it is sound).

    With ``checksums=False`` sizes are still compared but no file is hashed (fast for a quick
    structural check of a large corpus). The per-section work (checksums and units checks) runs
    on `workers` processes, or on the Dask cluster at `dask_address` (`histmol.parallel_map`).
    """
    recorded = [Problem(name, message) for name, message in check_local(root).items()]
    try:
        corpus = Corpus.open(root)
    except CorpusError as error:  # no folder at all: only that
        return [*(recorded if Path(root).is_dir() else []), Problem("corpus.json", str(error))]
    check = _Validator(corpus, checksums)
    check.problems.extend(recorded)  # first: a table the record refuses explains what follows
    genes = check.table("genes", GENES, GENES_SCHEMA)
    sections = check.table("sections", SECTIONS, SECTION_CORE_SCHEMA)
    manifest = check.table("manifest", MANIFEST, MANIFEST_SCHEMA)
    if genes is not None and not _schema_problems(GENES, genes, GENES_SCHEMA):
        check.genes(genes)
    rows = sections.to_pylist() if sections is not None else []
    entries = manifest.to_pylist() if manifest is not None else []
    if manifest is not None and _schema_problems(MANIFEST, manifest, MANIFEST_SCHEMA):
        return check.problems
    if sections is not None and not _schema_problems(SECTIONS, sections, SECTION_CORE_SCHEMA):
        check.sections(rows, entries)
    by_id = {r["section_id"]: r for r in rows}
    by_section: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_section.setdefault(entry["section_id"], []).append(entry)
    jobs = [(str(corpus.root), checksums, check.gene_index, by_id.get(sid), parts)
            for sid, parts in by_section.items()]
    found_by_section: Iterable[list[Problem]] = (
        (_check_section(job) for job in jobs)  # one process: progress as sections finish
        if workers == 1 and dask_address is None
        else parallel_map(_check_section, jobs, workers=workers, dask_address=dask_address)
    )
    for found in track(found_by_section, "validate", total=len(jobs), unit="sections"):
        check.problems.extend(found)
    check.stray(entries)
    return check.problems


def _check_section(
    job: tuple[str, bool, np.ndarray, dict[str, Any] | None, list[dict[str, Any]]],
) -> list[Problem]:
    """The problems of one section's parts (a job for `histmol.parallel_map`)."""
    root, checksums, gene_index, row, entries = job
    check = _Validator(Corpus.open(root), checksums)
    check.gene_index, check.n_genes = gene_index, len(gene_index)
    seen_ids: list[pa.Array] = []  # unique unit ids of the section's earlier parts
    for entry in entries:
        check.part(entry, row, seen_ids)
    return check.problems
