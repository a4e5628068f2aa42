"""The gene set a loader emits: all measured genes, a named list, or the top-k variable genes.

Every corpus of one histmol shares one gene space (`histmol.gene_reference`): a gene's stable
index and ``gene_id`` (reference Ensembl id, or ``unresolved:<species>:<name>``) mean the same
gene in every corpus, so corpora are matched by ``gene_id``. ``genes.parquet`` lists every
reference gene; ``"all"`` means the genes some committed section's panel measured. Each corpus
gets a lookup from its genes.parquet ROW (the dense position that `histmol.data.part` maps unit
gene indices to) to the output column (-1 when the gene is not emitted).

Gene spaces: ``"gene"`` (default: one column per gene) or ``"homolog"`` (human and mouse genes
of a one-to-one ortholog pair share one column, ``gene_id`` ``homolog:<group>``; every other gene
keeps its own column). Choose it with ``gene_space=`` or a ``homolog:`` prefix on the spec
(``"homolog:all"``, ``"homolog:hvg:2000"``). A section's panel mask marks a column measured when
its panel holds any gene mapping to it.

``hvg:K`` ranks columns by the variance of ``log1p(counts / unit_total * 1e4)`` (the normalisation
HEST-Benchmark and scanpy's ``normalize_total`` + ``log1p`` use) over the units of the sections
whose panel measured the gene: a unit of a section that never measured a gene does not count as
a zero. Per-gene sums are computed once per corpus and cached in the corpus as
``gene_stats.parquet`` (``GENE_STATS``): one row per genes.parquet row with ``index`` (int32, the
stable index), ``n_units`` (int64, units whose panel includes the gene), ``sum`` and ``sum_sq``
(float64, of the normalised values) and ``manifest_sha256`` (the sha256 of the
``manifest.parquet`` they were computed from: a corpus that gained or lost sections recomputes
them). Local corpora get the file through ``histmol.shards.atomic.atomic_write_parquet``; other
file systems through one ``pipe_file`` (an object store PUT is atomic); a corpus that cannot be
written to keeps working with the statistics in memory and a warning. In the homolog space a
column's sums pool its genes'. Pooled over corpora, the K columns of highest variance are
emitted in descending order of variance (ties: stable index order).
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


GENE_SPACES = ("gene", "homolog")


@dataclass(frozen=True)
class GeneSet:
    """The emitted columns (in order) and each corpus' genes.parquet row -> column lookup."""

    gene_id: tuple[str, ...]
    symbol: tuple[str | None, ...]
    species: tuple[str, ...]
    lookups: tuple[np.ndarray, ...]
    vocab: tuple[np.ndarray, ...]  # per corpus: the sorted stable indices of genes.parquet
    space: str = "gene"

    def __len__(self) -> int:
        return len(self.gene_id)

    def table(self) -> pd.DataFrame:
        """The emitted genes as a DataFrame (column order of the expression vectors)."""
        return pd.DataFrame({"gene_id": self.gene_id, "symbol": self.symbol,
                             "species": self.species})

    def panel_mask(self, corpus: int, panel: Sequence[int] | np.ndarray | None) -> np.ndarray:
        """Which output columns a section with this panel (stable gene indices) measured."""
        mask = np.zeros(len(self), dtype=bool)
        if panel is not None and len(panel):
            rows = dense_rows(self.vocab[corpus], np.asarray(panel, dtype=np.int64))
            cols = self.lookups[corpus][rows[rows >= 0]]
            mask[cols[cols >= 0]] = True
        return mask


def dense_rows(vocab: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows of the stable indices `index` in the sorted `vocab`; -1 where absent."""
    rows = np.searchsorted(vocab, index)
    inside = rows < len(vocab)
    found = np.zeros(len(index), dtype=bool)
    found[inside] = vocab[rows[inside]] == index[inside]
    return np.where(found, rows, -1)


def _frame(source: CorpusSource, space: str) -> pd.DataFrame:
    """A corpus' genes.parquet rows with their column key and whether a panel measured them."""
    genes = source.genes
    index = source.gene_index
    gene_id = genes.column("gene_id").to_numpy(zero_copy_only=False).astype(object)
    key = gene_id
    if space == "homolog":
        group = genes.column("homolog_group").to_numpy()
        key = np.where(group >= 0, np.char.add("homolog:", group.astype(str)).astype(object),
                       gene_id)
    measured = np.zeros(len(index), dtype=bool)
    for row in source.section_rows().values():
        rows = dense_rows(index, np.asarray(row.get("panel") or [], dtype=np.int64))
        measured[rows[rows >= 0]] = True
    return pd.DataFrame({
        "key": key, "index": index, "gene_id": gene_id,
        "ensembl_id": genes.column("ensembl_id").to_numpy(zero_copy_only=False),
        "symbol": genes.column("symbol").to_numpy(zero_copy_only=False),
        "species": genes.column("species").to_numpy(zero_copy_only=False),
        "measured": measured,
    })


def compute_gene_stats(source: CorpusSource,
                       sections: Collection[str] | None = None) -> pa.Table:
    """Per-gene n_units, sum and sum of squares of log1p-CP10k values over a corpus' units.

    With `sections`, over those sections' units only (a fold's training part).
    """
    vocab = source.gene_index
    n_vocab = len(vocab)
    n = np.zeros(n_vocab, dtype=np.int64)
    sums = np.zeros(n_vocab)
    sums_sq = np.zeros(n_vocab)
    panels = {sid: dense_rows(vocab, np.asarray(row["panel"] or [], dtype=np.int64))
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
        gene = dense_rows(vocab, genes.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64))
        count = table.column("counts").combine_chunks().values.to_numpy()[offsets[0]:offsets[-1]]
        n_units = len(offsets) - 1
        unit = np.repeat(np.arange(n_units), np.diff(offsets))
        total = np.bincount(unit, weights=count, minlength=n_units)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log1p(np.where(total[unit] > 0, count / total[unit] * TARGET_SUM, 0.0))
        if len(gene) and gene.min() < 0:
            raise CorpusError(f"{where}: gene_idx holds indices that genes.parquet lacks")
        sums += np.bincount(gene, weights=x, minlength=n_vocab)
        sums_sq += np.bincount(gene, weights=x * x, minlength=n_vocab)
        panel = panels[ref.section_id]
        n[panel[panel >= 0]] += n_units
    return pa.table({
        "index": pa.array(vocab.astype(np.int32)),
        "n_units": pa.array(n), "sum": pa.array(sums), "sum_sq": pa.array(sums_sq),
        "manifest_sha256": pa.array([source.manifest_sha256] * n_vocab, type=pa.string()),
    }, schema=GENE_STATS_SCHEMA)


def gene_stats(source: CorpusSource) -> pa.Table:
    """The corpus' cached gene statistics, computed and cached when absent or stale."""
    try:
        data = bytes(source.fs.cat_file(source.path(GENE_STATS)))
        cached = pq.read_table(pa.BufferReader(data))
        if (cached.schema.equals(GENE_STATS_SCHEMA) and cached.num_rows == len(source.gene_index)
                and np.array_equal(cached.column("index").to_numpy(), source.gene_index)
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


def _hvg(k: int, sources: list[CorpusSource], frames: list[pd.DataFrame],
         sections: Collection[str] | None = None) -> list[str]:
    pooled = []
    for source, frame in zip(sources, frames, strict=True):
        # a subset (a fold's training part) is not cached: the cache describes the whole corpus
        stats = gene_stats(source) if sections is None else compute_gene_stats(source, sections)
        pooled.append(frame[["key", "index"]].assign(
            n=stats.column("n_units").to_numpy(), s=stats.column("sum").to_numpy(),
            s2=stats.column("sum_sq").to_numpy()))
    sums = pd.concat(pooled).groupby("key", sort=False).agg(
        index=("index", "min"), n=("n", "sum"), s=("s", "sum"), s2=("s2", "sum"))
    measured = sums[sums["n"] > 0]
    if k > len(measured):
        raise ConfigError(
            f"genes='hvg:{k}' asks for {k} genes; the corpora measured {len(measured)}"
        )
    mean = measured["s"] / measured["n"]
    variance = (measured["s2"] / measured["n"] - mean * mean).to_numpy()
    order = np.lexsort((measured["index"].to_numpy(), -variance))[:k]
    return measured.index[order].tolist()


def _listed(names: Sequence[str], rows: pd.DataFrame) -> list[str]:
    """The column key of each named gene (key, gene_id, Ensembl id or symbol, exact case)."""
    candidates = pd.concat([
        pd.DataFrame({"name": rows[column].to_numpy(), "key": rows["key"].to_numpy()})
        for column in ("key", "gene_id", "ensembl_id", "symbol")
    ]).dropna().drop_duplicates()
    by_name = candidates.groupby("name")["key"].agg(list)
    chosen, problems = [], []
    for name in names:
        found = by_name.get(name, [])
        if len(found) != 1:
            problems.append(f"{name!r} ({'ambiguous' if found else 'unknown'})")
        else:
            chosen.extend(found)
    if problems:
        raise ConfigError(f"genes: {', '.join(problems[:10])} match no single gene_id or symbol")
    if len(set(chosen)) != len(chosen):
        raise ConfigError("genes: the list names a gene twice")
    return chosen


def resolve_genes(spec: str | Sequence[str], sources: list[CorpusSource],
                  gene_space: str = "gene", *,
                  sections: Collection[str] | None = None) -> GeneSet:
    """The GeneSet for ``"all"``, ``"hvg:K"`` or a list of gene ids / symbols.

    `gene_space` is ``gene`` or ``homolog``; a ``homolog:`` prefix on a string spec selects the
    homolog space too. `sections` restricts the ``hvg:K`` ranking to those section ids (None:
    every section).
    """
    if isinstance(spec, str) and spec.startswith("homolog:"):
        spec, gene_space = spec[len("homolog:"):], "homolog"
    if gene_space not in GENE_SPACES:
        raise ConfigError(f"gene_space must be one of {GENE_SPACES}, got {gene_space!r}")
    frames = [_frame(source, gene_space) for source in sources]
    rows = pd.concat(frames, ignore_index=True)
    if isinstance(spec, str):
        match = _HVG.match(spec)
        if spec == "all":
            measured = rows[rows["measured"]]
            chosen = measured.groupby("key")["index"].min().sort_values().index.tolist()
        elif match:
            chosen = _hvg(int(match.group(1)), sources, frames, sections)
        else:
            raise ConfigError(f"genes must be 'all', 'hvg:K' (optionally prefixed 'homolog:') or "
                              f"a list of genes, got {spec!r}")
    else:
        chosen = _listed([str(g) for g in spec], rows)
    if not chosen:
        raise ConfigError("the gene set is empty")
    columns = pd.Index(chosen)
    lookups = tuple(columns.get_indexer(frame["key"].to_numpy()).astype(np.int64)
                    for frame in frames)
    # each column's symbol and species: those of its members, lowest stable index first
    members = rows[columns.get_indexer(rows["key"].to_numpy()) >= 0].sort_values("index")
    first = members.drop_duplicates("key").set_index("key")
    species = members.drop_duplicates(["key", "species"]).groupby("key")["species"].agg(
        lambda s: "+".join(sorted(s)))
    return GeneSet(
        gene_id=tuple(chosen), symbol=tuple(first.loc[chosen, "symbol"].tolist()),
        species=tuple(species.loc[chosen].tolist()), lookups=lookups,
        vocab=tuple(source.gene_index for source in sources), space=gene_space,
    )
