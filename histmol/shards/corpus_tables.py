"""Schemas of the corpus tables and their deterministic construction from rows.

Tables are rebuilt from plain rows on every rewrite, sorted by key and with a fixed column order,
so their bytes depend on content only, never on build order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histmol.errors import CorpusError
from histmol.gene_reference import TAIL_BASE, reference

CORPUS_JSON = "corpus.json"
GENES = "genes.parquet"
SECTIONS = "sections.parquet"
MANIFEST = "manifest.parquet"

GENES_SCHEMA = pa.schema([
    pa.field("index", pa.int32(), nullable=False),
    pa.field("gene_id", pa.string(), nullable=False),
    pa.field("symbol", pa.string()),
    pa.field("ensembl_id", pa.string()),
    pa.field("species", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("homolog_group", pa.int32(), nullable=False),
])

MANIFEST_SCHEMA = pa.schema([
    pa.field("section_id", pa.string(), nullable=False),
    pa.field("part", pa.int32(), nullable=False),
    pa.field("images_path", pa.string(), nullable=False),
    pa.field("units_path", pa.string(), nullable=False),
    pa.field("n_pairs", pa.int64(), nullable=False),
    pa.field("n_units", pa.int64(), nullable=False),
    pa.field("images_bytes", pa.int64(), nullable=False),
    pa.field("units_bytes", pa.int64(), nullable=False),
    pa.field("images_sha256", pa.string(), nullable=False),
    pa.field("units_sha256", pa.string(), nullable=False),
])

# Fixed leading columns of sections.parquet; free metadata/QC columns follow, sorted by name.
SECTION_CORE_SCHEMA = pa.schema([
    pa.field("section_id", pa.string(), nullable=False),
    pa.field("platform", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("n_pairs", pa.int64()),
    pa.field("n_units", pa.int64()),
    pa.field("n_parts", pa.int64()),
    pa.field("n_genes", pa.int64()),
    pa.field("panel", pa.list_(pa.int32())),
    pa.field("config_hash", pa.string()),
    pa.field("input_fingerprint", pa.string()),
])
CORE_NAMES = frozenset(SECTION_CORE_SCHEMA.names)
RESERVED_ROW_KEYS = ("section_id", "status", "reason", "n_parts")


def parse_table(data: bytes | None, schema: pa.Schema, where: str,
                section_id: str | None = None) -> pa.Table:
    """A corpus table from its bytes (empty, typed by `schema`, when absent).

    With `section_id`, only that section's rows. CorpusError naming `where` when the bytes are
    not a readable Parquet file.
    """
    if data is None:
        return schema.empty_table()
    filters = None if section_id is None else [("section_id", "=", section_id)]
    try:
        return pq.read_table(pa.BufferReader(data), filters=filters)
    except (OSError, pa.ArrowInvalid) as error:
        raise CorpusError(f"{where}: not a readable Parquet table ({error})") from error


def parse_schema(data: bytes, where: str) -> pa.Schema:
    """The schema of a corpus table's bytes; CorpusError naming `where` when unreadable."""
    try:
        return pq.read_schema(pa.BufferReader(data))
    except (OSError, pa.ArrowInvalid) as error:
        raise CorpusError(f"{where}: not a readable Parquet table ({error})") from error


def _scalar(name: str, value: Any) -> Any:
    """A plain str/int/float/bool/None, or a flat list of numbers or strings."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | np.ndarray):
        items = [v.item() if isinstance(v, np.generic) else v for v in np.asarray(value).ravel()]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in items) or all(
            isinstance(v, str) for v in items
        ):
            return items
    raise ValueError(
        f"sections column {name!r}: metadata/QC values must be str, int, float, bool, None or a "
        f"flat list of numbers or strings, got {value!r}"
    )


def normalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """A section row with plain Python values: panel a list of ints, extras scalars."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"sections column names must be non-empty strings, got {name!r}")
        if name == "panel":
            out[name] = None if value is None else [int(v) for v in np.asarray(value).ravel()]
        else:
            out[name] = _scalar(name, value)
    if out.get("panel") is not None and out.get("n_genes") is None:
        out["n_genes"] = len(out["panel"])
    return out


def _extra_type(name: str, values: Iterable[Any]) -> pa.DataType:
    values = [v for v in values if v is not None]
    kinds = {type(v) for v in values}
    if kinds == {list}:
        items = {type(x) for v in values for x in v}
        if items == {str}:
            return pa.list_(pa.string())
        return pa.list_(pa.int64() if items == {int} else pa.float64())
    if not kinds:
        return pa.null()
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    if kinds == {str}:
        return pa.string()
    names = sorted(k.__name__ for k in kinds)
    raise ValueError(f"sections column {name!r} mixes value types {names} across sections")


_TYPE_SAMPLES: dict[pa.DataType, Any] = {
    pa.bool_(): True, pa.int64(): 0, pa.float64(): 0.0, pa.string(): "",
    pa.list_(pa.string()): [""], pa.list_(pa.int64()): [0], pa.list_(pa.float64()): [0.0],
}


def check_row_types(row: Mapping[str, Any], schemas: Iterable[pa.Schema]) -> None:
    """ValueError, as `sections_table` would raise, when a row's free column clashes in type.

    `schemas` are those of the corpus' sections tables (compacted and fragments): a commit
    checks its row against them, since its fragment is merged with the others only later.
    """
    schemas = list(schemas)
    for name, value in row.items():
        if name in CORE_NAMES or value is None:
            continue
        held = [schema.field(name).type for schema in schemas if name in schema.names]
        _extra_type(name, [value, *(_TYPE_SAMPLES[t] for t in held if t in _TYPE_SAMPLES)])


def sections_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """sections.parquet content: rows sorted by section_id, core columns then sorted extras.

    A row's ``panel`` may be a list or a NumPy array; the column is built from one concatenated
    array, not from Python ints (a histMol-sized table holds ~50 M panel entries).
    """
    ordered = sorted((dict(r) for r in rows), key=lambda r: r["section_id"])
    panels = [r.pop("panel", None) for r in ordered]
    extras = sorted({k for r in ordered for k in r} - CORE_NAMES)
    fields = list(SECTION_CORE_SCHEMA) + [
        pa.field(name, _extra_type(name, (r.get(name) for r in ordered))) for name in extras
    ]
    schema = pa.schema(fields)
    at = schema.get_field_index("panel")
    table = pa.Table.from_pylist(ordered, schema=schema.remove(at))
    return table.add_column(at, schema.field(at), _panel_column(panels))


def _panel_column(panels: list[Any]) -> pa.Array:
    """list<int32> column from per-row panels (None: null)."""
    arrays = [(p if isinstance(p, np.ndarray) and p.dtype == np.int32
               else np.asarray(p, dtype=np.int64)).ravel() for p in panels if p is not None]
    values = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)
    if values.dtype != np.int32:  # rows from builders (Python ints): check the range once
        if len(values) and (values.min() < np.iinfo(np.int32).min
                            or values.max() > np.iinfo(np.int32).max):
            raise ValueError("sections column 'panel': vocabulary indices exceed int32")
        values = values.astype(np.int32)
    lengths = [0 if p is None else int(np.size(p)) for p in panels]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    mask = pa.array([p is None for p in panels], pa.bool_())
    column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                      pa.array(values), mask=mask)
    return column.cast(SECTION_CORE_SCHEMA.field("panel").type)


def section_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of a sections table; ``panel`` as int32 NumPy views (no Python int per entry)."""
    if "panel" not in table.column_names:
        return table.to_pylist()
    rows = table.drop_columns(["panel"]).to_pylist()
    panels = table.column("panel").combine_chunks()
    offsets = panels.offsets.to_numpy()
    values = panels.values.to_numpy(zero_copy_only=False)
    valid = panels.is_valid().to_numpy(zero_copy_only=False)
    for i, row in enumerate(rows):
        row["panel"] = values[offsets[i]:offsets[i + 1]] if valid[i] else None
    return rows


def manifest_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """manifest.parquet content: rows sorted by (section_id, part)."""
    ordered = sorted(rows, key=lambda r: (r["section_id"], r["part"]))
    return pa.Table.from_pylist(list(ordered), schema=MANIFEST_SCHEMA)


def reference_vocabulary() -> pa.Table:
    """genes.parquet of a new corpus: every reference gene, index = its reference row."""
    genes = reference().genes
    return pa.table({
        "index": pa.array(genes["index"].to_numpy(np.int32)),
        "gene_id": pa.array(genes["ensembl_id"].to_numpy(object), pa.string()),
        "symbol": pa.array(genes["symbol"].to_numpy(object), pa.string()),
        "ensembl_id": pa.array(genes["ensembl_id"].to_numpy(object), pa.string()),
        "species": pa.array(genes["species"].to_numpy(object), pa.string()),
        "kind": pa.array(["gene"] * len(genes), pa.string()),
        "homolog_group": pa.array(genes["homolog_group"].to_numpy(np.int32)),
    }, schema=GENES_SCHEMA)


def add_unresolved(vocabulary: pa.Table, genes: pd.DataFrame) -> pa.Table | None:
    """`vocabulary` with the unresolved keys of `genes` (resolved rows) added; None if none new.

    The tail is a set: rows are unique by index and sorted by it, so the result does not depend
    on the order keys arrive in. A key whose index another key already holds is a ValueError
    naming both (a 30-bit hash collision; see `histmol.gene_reference`).
    """
    tail = genes.loc[~genes["resolved"].to_numpy(bool), ["index", "gene_id", "symbol", "species"]]
    if tail.empty:
        return None
    index = vocabulary.column("index").to_numpy()
    held = dict(zip(index[index >= TAIL_BASE].tolist(),
                    vocabulary.column("gene_id").to_numpy(zero_copy_only=False)[index >= TAIL_BASE],
                    strict=True))
    new: dict[int, dict[str, Any]] = {}
    for row in tail.drop_duplicates("gene_id").itertuples(index=False):
        other = held.get(int(row.index)) or new.get(int(row.index), {}).get("gene_id")
        if other is not None and other != row.gene_id:
            raise ValueError(f"gene keys {other!r} and {row.gene_id!r} hash to one index "
                             f"{int(row.index)}")
        if other is None:
            new[int(row.index)] = {"index": int(row.index), "gene_id": row.gene_id,
                                   "symbol": row.symbol, "ensembl_id": None,
                                   "species": row.species, "kind": "unresolved",
                                   "homolog_group": -1}
    if not new:
        return None
    added = pa.Table.from_pylist(list(new.values()), schema=GENES_SCHEMA)
    merged = pa.concat_tables([vocabulary.cast(GENES_SCHEMA), added])
    return merged.take(pc.sort_indices(merged.column("index")))


def section_row(
    section_id: str,
    row: Mapping[str, Any],
    *,
    status: str,
    reason: str | None,
    n_pairs: int,
    n_units: int,
    n_parts: int,
) -> dict[str, Any]:
    """A sections.parquet row from the builder's `row` plus the fields the corpus owns."""
    clash = [k for k in RESERVED_ROW_KEYS if k in row]
    if clash:
        raise ValueError(f"section row must not set {clash}: the corpus sets them")
    if not row.get("platform"):
        raise ValueError("section row needs a 'platform'")
    if status == "committed":
        for key, value in (("n_pairs", n_pairs), ("n_units", n_units)):
            if key in row and row[key] != value:
                raise ValueError(f"section row says {key}={row[key]}, the records hold {value}")
    out = normalize_row(dict(row))
    out.update(section_id=section_id, status=status, reason=reason, n_pairs=n_pairs,
               n_units=n_units, n_parts=n_parts)
    return out
