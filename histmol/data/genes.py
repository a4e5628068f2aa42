"""The gene set a loader emits: all genes, a named list, or the top-k variable genes (``hvg:K``).

Several corpora have separate vocabularies; genes are matched across them by the key
``(gene_id, species)`` of ``genes.parquet``, and each corpus gets a lookup from its vocabulary
index to the output column (-1 when the gene is not emitted).

``hvg:K`` ranks genes by the variance of ``log1p(counts / unit_total * 1e4)`` (the normalisation
HEST-Benchmark and scanpy's ``normalize_total`` + ``log1p`` use) over the units of the sections
whose panel measured the gene: a unit of a section that never measured a gene does not count as
a zero. Per-gene sums are computed once per corpus and cached in the corpus as
``gene_stats.parquet`` (``GENE_STATS``): one row per vocabulary entry with ``index`` (int32),
``n_units`` (int64, units whose panel includes the gene), ``sum`` and ``sum_sq`` (float64, of the
normalised values) and ``manifest_sha256`` (the sha256 of the ``manifest.parquet`` they were
computed from: a corpus that gained or lost sections recomputes them). Local corpora get the file
through ``histmol.shards.atomic.atomic_write_parquet``; other file systems through one
``pipe_file`` (an object store PUT is atomic); a corpus that cannot be written to keeps working
with the statistics in memory and a warning. Pooled over corpora, the K genes of highest variance
are emitted in descending order of variance (ties: vocabulary order).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histmol.data.fetch import check_bytes
from histmol.data.source import CorpusSource
from histmol.errors import ConfigError, CorpusError
from histmol.shards.atomic import atomic_write_parquet, write_parquet

GENE_STATS = "gene_stats.parquet"
GENE_STATS_SCHEMA = pa.schema([
    pa.field("index", pa.int32(), nullable=False),
    pa.field("n_units", pa.int64(), nullable=False),
    pa.field("sum", pa.float64(), nullable=False),
    pa.field("sum_sq", pa.float64(), nullable=False),
    pa.field("manifest_sha256", pa.string(), nullable=False),
])
TARGET_SUM = 1e4
_HVG = re.compile(r"^hvg:([1-9][0-9]*)$")
GeneKey = tuple[str, str]


@dataclass(frozen=True)
class GeneSet:
    """The emitted genes (output column order) and each corpus' vocabulary -> column lookup."""

    gene_id: tuple[str, ...]
    symbol: tuple[str | None, ...]
    species: tuple[str, ...]
    lookups: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.gene_id)

    def table(self) -> pd.DataFrame:
        """The emitted genes as a DataFrame (column order of the expression vectors)."""
        return pd.DataFrame({"gene_id": self.gene_id, "symbol": self.symbol,
                             "species": self.species})

    def panel_mask(self, corpus: int, panel: Sequence[int] | np.ndarray | None) -> np.ndarray:
        """Which output genes a section with this panel (vocabulary indices) measured."""
        mask = np.zeros(len(self), dtype=bool)
        if panel is not None and len(panel):
            lookup = self.lookups[corpus]
            panel = np.asarray(panel, dtype=np.int64)
            cols = lookup[panel[(panel >= 0) & (panel < len(lookup))]]
            mask[cols[cols >= 0]] = True
        return mask


def _keys(source: CorpusSource) -> list[GeneKey]:
    genes = source.genes
    index = genes.column("index").to_numpy()
    if not np.array_equal(index, np.arange(len(index))):
        raise CorpusError(f"{source.describe('genes.parquet')}: index is not 0..n-1 in order")
    return list(zip(genes.column("gene_id").to_pylist(), genes.column("species").to_pylist(),
                    strict=True))


def compute_gene_stats(source: CorpusSource,
                       sections: Collection[str] | None = None) -> pa.Table:
    """Per-gene n_units, sum and sum of squares of log1p-CP10k values over a corpus' units.

    With `sections`, over those sections' units only (a fold's training part).
    """
    n_vocab = source.genes.num_rows
    n = np.zeros(n_vocab, dtype=np.int64)
    sums = np.zeros(n_vocab)
    sums_sq = np.zeros(n_vocab)
    panels = {sid: np.asarray(row["panel"] or [], dtype=np.int64)
              for sid, row in source.section_rows().items()}
    for ref in source.parts():
        if sections is not None and ref.section_id not in sections:
            continue
        data = source.read_bytes(ref.units_path)
        where = source.describe(ref.units_path)
        check_bytes(data, ref.units_bytes, ref.units_sha256, "sha256", where)
        table = pq.read_table(pa.BufferReader(data), columns=["gene_idx", "counts"])
        genes = table.column("gene_idx").combine_chunks()
        offsets = genes.offsets.to_numpy()
        gene = genes.values.to_numpy()[offsets[0]:offsets[-1]]
        count = table.column("counts").combine_chunks().values.to_numpy()[offsets[0]:offsets[-1]]
        n_units = len(offsets) - 1
        unit = np.repeat(np.arange(n_units), np.diff(offsets))
        total = np.bincount(unit, weights=count, minlength=n_units)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log1p(np.where(total[unit] > 0, count / total[unit] * TARGET_SUM, 0.0))
        if len(gene) and (gene.min() < 0 or gene.max() >= n_vocab):
            raise CorpusError(f"{where}: gene_idx outside the vocabulary 0..{n_vocab - 1}")
        sums += np.bincount(gene, weights=x, minlength=n_vocab)
        sums_sq += np.bincount(gene, weights=x * x, minlength=n_vocab)
        n[panels[ref.section_id]] += n_units
    return pa.table({
        "index": pa.array(np.arange(n_vocab, dtype=np.int32)),
        "n_units": pa.array(n), "sum": pa.array(sums), "sum_sq": pa.array(sums_sq),
        "manifest_sha256": pa.array([source.manifest_sha256] * n_vocab, type=pa.string()),
    }, schema=GENE_STATS_SCHEMA)


def gene_stats(source: CorpusSource) -> pa.Table:
    """The corpus' cached gene statistics, computed and cached when absent or stale."""
    try:
        data = bytes(source.fs.cat_file(source.path(GENE_STATS)))
        cached = pq.read_table(pa.BufferReader(data))
        if (cached.schema.equals(GENE_STATS_SCHEMA) and cached.num_rows == source.genes.num_rows
                and set(cached.column("manifest_sha256").to_pylist())
                <= {source.manifest_sha256}):
            return cached
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        pass
    stats = compute_gene_stats(source)
    try:
        if source.local_root is not None:
            atomic_write_parquet(source.local_root / GENE_STATS, stats)
        else:
            buffer = io.BytesIO()
            write_parquet(buffer, stats)  # type: ignore[arg-type]
            source.fs.pipe_file(source.path(GENE_STATS), buffer.getvalue())
    except (OSError, NotImplementedError) as error:
        warnings.warn(f"{source.describe(GENE_STATS)}: cannot cache gene statistics ({error})",
                      stacklevel=2)
    return stats


def _hvg(k: int, sources: list[CorpusSource], keys: list[list[GeneKey]],
         union: dict[GeneKey, int], sections: Collection[str] | None = None) -> list[GeneKey]:
    n = np.zeros(len(union), dtype=np.int64)
    sums, sums_sq = np.zeros(len(union)), np.zeros(len(union))
    for source, corpus_keys in zip(sources, keys, strict=True):
        # a subset (a fold's training part) is not cached: the cache describes the whole corpus
        stats = gene_stats(source) if sections is None else compute_gene_stats(source, sections)
        at = np.array([union[key] for key in corpus_keys], dtype=np.int64)
        np.add.at(n, at, stats.column("n_units").to_numpy())
        np.add.at(sums, at, stats.column("sum").to_numpy())
        np.add.at(sums_sq, at, stats.column("sum_sq").to_numpy())
    measured = np.flatnonzero(n > 0)
    if k > len(measured):
        raise ConfigError(
            f"genes='hvg:{k}' asks for {k} genes; the corpora measured {len(measured)}"
        )
    mean = sums[measured] / n[measured]
    variance = sums_sq[measured] / n[measured] - mean * mean
    top = measured[np.lexsort((measured, -variance))[:k]]
    ordered = list(union)
    return [ordered[i] for i in top]


def _listed(names: Sequence[str], union: dict[GeneKey, int],
            symbols: dict[GeneKey, str | None]) -> list[GeneKey]:
    by_id: dict[str, list[GeneKey]] = {}
    by_symbol: dict[str, list[GeneKey]] = {}
    for key in union:
        by_id.setdefault(key[0], []).append(key)
        if symbols.get(key):
            by_symbol.setdefault(str(symbols[key]), []).append(key)
    chosen, problems = [], []
    for name in names:
        found = by_id.get(name) or by_symbol.get(name) or []
        if len(found) != 1:
            problems.append(f"{name!r} ({'ambiguous' if found else 'unknown'})")
        else:
            chosen.extend(found)
    if problems:
        raise ConfigError(f"genes: {', '.join(problems[:10])} match no single gene_id or symbol")
    if len(set(chosen)) != len(chosen):
        raise ConfigError("genes: the list names a gene twice")
    return chosen


def resolve_genes(spec: str | Sequence[str], sources: list[CorpusSource], *,
                  sections: Collection[str] | None = None) -> GeneSet:
    """The GeneSet for ``"all"``, ``"hvg:K"`` or a list of gene ids / symbols.

    `sections` restricts the ``hvg:K`` ranking to those section ids (None: every section).
    """
    keys = [_keys(source) for source in sources]
    union: dict[GeneKey, int] = {}
    symbols: dict[GeneKey, str | None] = {}
    for source, corpus_keys in zip(sources, keys, strict=True):
        for key, symbol in zip(corpus_keys, source.genes.column("symbol").to_pylist(),
                               strict=True):
            union.setdefault(key, len(union))
            symbols.setdefault(key, symbol)
    if isinstance(spec, str):
        match = _HVG.match(spec)
        if spec == "all":
            chosen = list(union)
        elif match:
            chosen = _hvg(int(match.group(1)), sources, keys, union, sections)
        else:
            raise ConfigError(f"genes must be 'all', 'hvg:K' or a list of genes, got {spec!r}")
    else:
        chosen = _listed([str(g) for g in spec], union, symbols)
    if not chosen:
        raise ConfigError("the gene set is empty")
    column = {key: i for i, key in enumerate(chosen)}
    lookups = tuple(
        np.array([column.get(key, -1) for key in corpus_keys], dtype=np.int64)
        for corpus_keys in keys
    )
    return GeneSet(
        gene_id=tuple(k[0] for k in chosen), symbol=tuple(symbols[k] for k in chosen),
        species=tuple(k[1] for k in chosen), lookups=lookups,
    )
