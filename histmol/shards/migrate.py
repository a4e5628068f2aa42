"""`histmol migrate`: rewrite a corpus of an older gene vocabulary to the current one, in place.

Why: format 1 corpora hold gene indices in build order, and a corpus made with another gene
reference holds other stable indices; this histmol refuses both (`check_format`). Migration
resolves every old vocabulary entry to the current reference (`resolve_features`: Ensembl id,
symbol, alias; unresolved keys stay unresolved keys), then rewrites what holds gene indices:
each part's units parquet (``gene_idx`` remapped; two old genes that became one are summed),
``sections.parquet`` (``panel``), ``manifest.parquet`` (the units' new sha256 and bytes) and
``genes.parquet``. JPEG shards are untouched. ``gene_stats.parquet`` is removed (recomputed on
next use).

Atomic and resumable, under the corpus lock: each units file is rewritten to a temporary sibling
and renamed; ``.migrate.json`` records the new sha256 and size of each rewritten file, so a rerun
after a crash skips the files already done (it recognises a file by its sha256: the manifest's
old one means "to do", the journal's new one "done"). The new tables are then written beside the
old ones (``<name>.migrated``), the journal notes it, and they are renamed into place; a rerun
after that point only finishes the renames. ``corpus.json`` is written last: until then every
reader refuses the corpus, so nothing ever reads a half-migrated one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histmol.errors import CorpusError
from histmol.gene_reference import REFERENCE_SPECIES, UNRESOLVED, reference, resolve_features
from histmol.shards.atomic import (
    PARQUET_COMPRESSION,
    atomic_write_json,
    atomic_write_parquet,
    fsync_path,
    remove_path,
    temp_name,
)
from histmol.shards.commit_record import RECORD, CommitRecord, local_reader, reseal
from histmol.shards.corpus import (
    CORPUS_JSON,
    FORMAT,
    FORMAT_VERSION,
    GENES,
    LOCK,
    MANIFEST,
    SECTIONS,
    corpus_meta,
)
from histmol.shards.corpus_tables import (
    MANIFEST_SCHEMA,
    add_unresolved,
    manifest_table,
    reference_vocabulary,
    sections_table,
)
from histmol.shards.fragments import compact, local_store
from histmol.shards.staging import CorpusLock

JOURNAL = ".migrate.json"
MIGRATED = ".migrated"
TABLES_READY = "_tables_ready"
GENE_STATS = "gene_stats.parquet"


def needs_migration(meta: dict[str, Any]) -> bool:
    """True when corpus.json describes a corpus this histmol must migrate before reading."""
    return meta.get("format") == FORMAT and (
        meta.get("format_version") == 1
        or (meta.get("format_version") == FORMAT_VERSION
            and meta.get("gene_reference") != reference().version))


def old_to_new(old: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Stable new index of each old vocabulary row (by old index), and the resolved rows."""
    gene_id = old["gene_id"].astype(str)
    keyed = gene_id.str.startswith(f"{UNRESOLVED}:")
    key_parts = gene_id[keyed].str.split(":", n=2)
    ids = gene_id.where(~keyed, key_parts.str[2])
    names = old["symbol"].fillna(gene_id).astype(str).where(~keyed, key_parts.str[2])
    species = old["species"].astype(str).where(~keyed, key_parts.str[1])
    resolved = []
    for value in sorted(species.unique()):
        rows = species == value
        hint = value if value in REFERENCE_SPECIES else None
        part = resolve_features(ids[rows].to_numpy(object), names[rows].to_numpy(object), hint)
        part.index = old.index[rows.to_numpy()]
        resolved.append(part)
    table = pd.concat(resolved).loc[old.index]
    mapping = np.full(int(old["index"].max()) + 1 if len(old) else 0, -1, dtype=np.int64)
    mapping[old["index"].to_numpy(np.int64)] = table["index"].to_numpy(np.int64)
    return mapping, table.reset_index(drop=True)


def remap_units(table: pa.Table, mapping: np.ndarray) -> pa.Table:
    """`table` with ``gene_idx`` remapped; genes that became one in a unit are summed."""
    genes = table.column("gene_idx").combine_chunks()
    counts = table.column("counts").combine_chunks()
    offsets = genes.offsets.to_numpy().astype(np.int64)
    values = genes.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64)
    numbers = counts.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64)
    unit = np.repeat(np.arange(table.num_rows), np.diff(offsets))
    new = mapping[values]
    order = np.lexsort((new, unit))
    unit, new, numbers = unit[order], new[order], numbers[order]
    first = np.ones(len(new), dtype=bool)
    first[1:] = (unit[1:] != unit[:-1]) | (new[1:] != new[:-1])
    starts = np.flatnonzero(first)
    summed = np.add.reduceat(numbers, starts) if len(starts) else numbers
    lengths = np.bincount(unit[starts], minlength=table.num_rows)
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(new[starts].astype(np.int32)))
    count_column = pa.ListArray.from_arrays(pa.array(new_offsets),
                                            pa.array(summed.astype(np.int32)))
    table = table.set_column(table.schema.get_field_index("gene_idx"), "gene_idx",
                             column.cast(table.schema.field("gene_idx").type))
    return table.set_column(table.schema.get_field_index("counts"), "counts",
                            count_column.cast(table.schema.field("counts").type))


def _rewrite_units(path: Path, mapping: np.ndarray) -> tuple[str, int]:
    """Rewrite one units parquet (row group by row group) atomically; its (sha256, bytes)."""
    source = pq.ParquetFile(path)
    tmp = path.with_name(temp_name(path.name))
    try:
        with pq.ParquetWriter(tmp, source.schema_arrow, compression=PARQUET_COMPRESSION) as out:
            for group in range(source.num_row_groups):
                table = remap_units(source.read_row_group(group), mapping)
                out.write_table(table, row_group_size=max(1, table.num_rows))
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def migrate_corpus(root: str | os.PathLike[str]) -> dict[str, int]:
    """Migrate the corpus at `root` to this histmol's format and gene reference (see module doc).

    Returns counts: ``parts`` rewritten now, ``parts_done_before`` (an earlier interrupted run),
    ``genes_resolved`` and ``genes_unresolved`` (old vocabulary entries). A corpus that needs no
    migration returns all zeros and changes nothing.
    """
    root = Path(root)
    meta_path = root / CORPUS_JSON
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError) as error:
        raise CorpusError(f"{meta_path}: not a readable histmol corpus ({error})") from error
    stats = {"parts": 0, "parts_done_before": 0, "genes_resolved": 0, "genes_unresolved": 0}
    if not needs_migration(meta):
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise CorpusError(f"{meta_path}: format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r} cannot be migrated")
        return stats
    with CorpusLock(root / LOCK).hold():
        journal_path = root / JOURNAL
        journal: dict[str, Any] = (
            json.loads(journal_path.read_bytes()) if journal_path.exists() else {})
        if not journal.get(TABLES_READY):
            _compact_fragments(root)
            _rewrite(root, journal, stats)
        for name in (MANIFEST, SECTIONS, GENES):  # the renames a crash may have interrupted
            staged = root / f"{name}{MIGRATED}"
            if staged.exists():
                os.replace(staged, root / name)
        remove_path(root / GENE_STATS)
        atomic_write_json(meta_path, corpus_meta(meta.get("build_config") or {}))
        reseal(root)  # the commit record blesses the rewritten tables: last
        remove_path(journal_path)
    return stats


def _compact_fragments(root: Path) -> None:
    """Merge fragments into the tables first: the rewrite reads the compacted tables only."""
    raw = local_reader(root)(RECORD)
    if raw is not None and CommitRecord.from_bytes(raw, str(root / RECORD)).fragments:
        compact(local_store(root))


def _rewrite(root: Path, journal: dict[str, Any], stats: dict[str, int]) -> None:
    """Rewrite the units files, then stage the new tables as ``<name>.migrated``."""
    journal_path = root / JOURNAL
    old = pq.read_table(root / GENES).to_pandas()
    mapping, resolved = old_to_new(old)
    stats["genes_resolved"] = int(resolved["resolved"].sum())
    stats["genes_unresolved"] = int((~resolved["resolved"]).sum())
    manifest = pq.read_table(root / MANIFEST).to_pylist()
    for row in manifest:
        path = root / row["units_path"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        done = journal.get(row["units_path"])
        if done is not None and digest == done[0]:
            stats["parts_done_before"] += 1
        elif digest == row["units_sha256"]:
            journal[row["units_path"]] = list(_rewrite_units(path, mapping))
            atomic_write_json(journal_path, journal)
            stats["parts"] += 1
        else:
            raise CorpusError(f"{path}: sha256 matches neither the manifest nor "
                              f"{JOURNAL}; the file changed outside histmol")
        row["units_sha256"], row["units_bytes"] = journal[row["units_path"]]
    sections = pq.read_table(root / SECTIONS).to_pylist()
    for row in sections:
        if row.get("panel") is not None:
            row["panel"] = sorted({int(v) for v in mapping[np.asarray(row["panel"],
                                                                      dtype=np.int64)]})
            row["n_genes"] = len(row["panel"])
    genes = add_unresolved(reference_vocabulary(), resolved) or reference_vocabulary()
    for name, table in ((MANIFEST, manifest_table(manifest).cast(MANIFEST_SCHEMA)),
                        (SECTIONS, sections_table(sections)), (GENES, genes)):
        atomic_write_parquet(root / f"{name}{MIGRATED}", table)
    journal[TABLES_READY] = True
    atomic_write_json(journal_path, journal)
