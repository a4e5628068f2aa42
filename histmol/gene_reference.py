"""The shipped gene reference, and resolution of a panel's features to it.

Why: a gene must be one gene whatever the bundle calls it (Ensembl id, current symbol, previous
symbol or alias, R-mangled name) so that every platform and both species meet in one gene space.
The reference (``histmol/reference/``, built offline by ``scripts/build_gene_reference.py``; no
download at run time) holds every human and mouse Ensembl gene of its sources in a fixed row
order: a gene's row is its stable global index. Features that resolve to no single reference
gene are kept under the key ``unresolved:<species>:<name>`` with the index
``TAIL_BASE + (first 30 bits of sha256(key))``: stable, order-free and above every reference
index. The name in the key is the feature's unversioned Ensembl id when it has one (so a retired id
is one key whichever bundle spells it), else its name. Two different keys hashing to one index
are a CorpusError when they meet in a corpus
(about one chance in 2**30 per pair of keys).

Resolution, per feature, first match wins: the Ensembl id (version stripped) of the id column
or of the name; the current symbol, exactly, then in any letter case where that names one gene
of the species (human symbols are upper case, mouse ones Title case); a previous symbol or alias
where it names one gene; the same for R's ``make.names`` spelling undone (``HLA.DRA`` ->
``HLA-DRA``, ``X4933401J01Rik`` -> ``4933401J01Rik``). The panel's species comes from the caller
or from the panel itself (Ensembl id prefixes, else which species' symbols its names are); a
panel with both human and mouse evidence is ``mixed``: its Ensembl ids still resolve (each names
its own species) but its symbols do not, as guessing a species per symbol would be a guess.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
TAIL_BASE = 1 << 30
UNRESOLVED = "unresolved"
MIXED, UNKNOWN = "mixed", "unknown"
REFERENCE_SPECIES = ("human", "mouse")
ENSEMBL_PREFIX_SPECIES = {"ENSG": "human", "ENSMUSG": "mouse", "ENSRNOG": "rat",
                          "ENSDARG": "zebrafish"}
# A panel is mixed when its minority species has at least this share of the evidence (and at
# least MIXED_MIN features): a stray match is noise, a tenth of the panel is not.
MIXED_SHARE, MIXED_MIN = 0.1, 3


@dataclass(frozen=True)
class Reference:
    """The reference genes (row = stable index) and the names that point at them."""

    version: str
    genes: pd.DataFrame  # index, species, ensembl_id, symbol, homolog_group
    ensembl: pd.Index  # ensembl ids in row order (its hash table is built once, then reused)
    has_symbol: np.ndarray  # bool per row
    exact: dict[str, tuple[pd.Index, np.ndarray]]  # species -> (names, index): symbols, aliases
    folded: dict[str, tuple[pd.Index, np.ndarray]]  # species -> upper-case names, unambiguous


@functools.cache
def reference() -> Reference:
    """The shipped reference, read once per process."""
    table = pq.read_table(REFERENCE_DIR / "genes.parquet")
    version = table.schema.metadata[b"histmol_reference"].decode()
    genes = table.to_pandas()
    names = pq.read_table(REFERENCE_DIR / "names.parquet")
    species, kind = names.column("species"), names.column("kind")
    exact, folded = {}, {}
    for value in REFERENCE_SPECIES:
        for out, kinds in ((exact, ["symbol", "alias"]), (folded, ["folded"])):
            # the build keeps each kind's names unique per species, symbols and aliases disjoint
            wanted = pc.and_(pc.equal(species, value), pc.is_in(kind, pa.array(kinds)))
            chosen = names.filter(wanted)
            out[value] = (pd.Index(chosen.column("name").to_numpy().astype(object)),
                          chosen.column("index").to_numpy().astype(np.int64))
    has_symbol = table.column("symbol").is_valid().to_numpy(zero_copy_only=False)
    return Reference(version, genes, pd.Index(genes["ensembl_id"].to_numpy()), has_symbol, exact,
                     folded)


def unresolved_key(species: str, name: str) -> str:
    """The explicit key of a feature that resolves to no reference gene."""
    return f"{UNRESOLVED}:{species}:{name}"


def tail_index(key: str) -> int:
    """The stable index of an unresolved key: TAIL_BASE + 30 bits of its sha256."""
    digest = hashlib.sha256(key.encode()).digest()
    return TAIL_BASE + (int.from_bytes(digest[:4], "big") >> 2)


def _strings(values: Sequence[str] | np.ndarray) -> pa.Array:
    """Values as a pyarrow string array, whitespace trimmed."""
    array = np.asarray(values, dtype=object)
    try:
        strings = pa.array(array, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # not all str (numbers, bytes): stringify
        strings = pa.array(array.astype(str), pa.string())
    return pc.utf8_trim_whitespace(pc.fill_null(strings, ""))


def _ensembl(values: pa.Array) -> pa.Array:
    """The unversioned Ensembl gene id of each value, null where it is none."""
    return pc.struct_field(pc.extract_regex(values, r"^(?P<id>ENS[A-Z]*G\d{11})(?:\.\d+)?$"),
                           [0])


def _lookup(table: tuple[pd.Index, np.ndarray], names: pa.Array) -> np.ndarray:
    """Indices of `names` in a (names, index) table, -1 where absent."""
    at = table[0].get_indexer(names.to_numpy(zero_copy_only=False))
    return np.where(at >= 0, table[1][at], -1)


def _r_unmangled(names: pa.Array) -> pa.Array:
    """Undo R's make.names: dots for dashes, an X before a leading digit."""
    dashed = pc.replace_substring(names, ".", "-")
    return pc.replace_substring_regex(dashed, r"^X(\d)", r"\1")


def panel_species(ensembl: pa.Array, names: pa.Array) -> str:
    """``human``, ``mouse``, ``mixed`` or ``unknown`` from a panel's ids and names."""
    has_id = ensembl.is_valid().to_numpy(zero_copy_only=False)
    counts = pd.Series({
        species: int(pc.sum(pc.match_substring_regex(ensembl, f"^{prefix}\\d")).as_py() or 0)
        for prefix, species in ENSEMBL_PREFIX_SPECIES.items()})
    rest = names.filter(pa.array(~has_id))
    if len(rest):  # features without an id: which species' names (exact case) they are
        ref = reference()
        hits = {s: _lookup(ref.exact[s], rest) >= 0 for s in REFERENCE_SPECIES}
        for species, other in (("human", "mouse"), ("mouse", "human")):
            counts[species] += int((hits[species] & ~hits[other]).sum())
    counts = counts[counts > 0].sort_values(ascending=False, kind="stable")
    if counts.empty:
        return UNKNOWN
    minority = counts.iloc[1:].sum()
    if minority >= MIXED_MIN and minority >= MIXED_SHARE * counts.sum():
        return MIXED
    return str(counts.index[0])


def resolve_features(
    ids: Sequence[str] | np.ndarray, names: Sequence[str] | np.ndarray, species: str | None = None
) -> pd.DataFrame:
    """Resolve a panel's features to the reference (vectorised; see the module docstring).

    Returns one row per feature, in order: ``gene_id`` (the reference Ensembl id, or the
    unresolved key), ``symbol`` (reference symbol, else the feature's name), ``ensembl_id``
    (reference id or None), ``feature`` (the name as given), ``species`` (the gene's; for
    unresolved features the panel's), ``resolved`` (bool) and ``index`` (int64, stable).
    An id that already is an unresolved key is kept as it is (resolving twice changes nothing).
    String work runs in pyarrow kernels: ~36 k features resolve well under a second.
    """
    ref = reference()
    ids_a, names_a = _strings(ids), _strings(names)
    names_a = pc.if_else(pc.equal(names_a, ""), ids_a, names_a)
    keyed = pc.starts_with(ids_a, f"{UNRESOLVED}:").to_numpy(zero_copy_only=False)
    ensembl = pc.coalesce(_ensembl(ids_a), _ensembl(names_a))
    unkeyed = pa.array(~keyed)
    panel = species or panel_species(ensembl.filter(unkeyed), names_a.filter(unkeyed))
    index = ref.ensembl.get_indexer(ensembl.to_numpy(zero_copy_only=False)).astype(np.int64)
    index[keyed] = -1
    has_id = ensembl.is_valid().to_numpy(zero_copy_only=False)
    if panel in REFERENCE_SPECIES:
        for unmangle in (False, True):
            todo = np.flatnonzero((index < 0) & ~keyed & ~has_id)
            candidates = names_a.take(pa.array(todo))
            if unmangle:  # only names R may have mangled are worth a second look
                mangled = pc.match_substring_regex(candidates, r"\.|^X\d").to_numpy(
                    zero_copy_only=False)
                todo, candidates = todo[mangled], _r_unmangled(candidates.filter(mangled))
            for table, key in ((ref.exact[panel], candidates),
                               (ref.folded[panel], pc.utf8_upper(candidates))):
                if len(todo):
                    found = _lookup(table, key)
                    index[todo] = np.where(index[todo] < 0, found, index[todo])
    resolved = index >= 0
    genes = ref.genes
    rows = np.where(resolved, index, 0)
    names_np = names_a.to_numpy(zero_copy_only=False).astype(object)
    gene_species = np.where(resolved, genes["species"].to_numpy()[rows], panel).astype(object)
    ensembl_ids = np.where(resolved, genes["ensembl_id"].to_numpy()[rows], None)
    symbols = np.where(resolved & ref.has_symbol[rows], genes["symbol"].to_numpy()[rows], names_np)
    gene_id = np.where(resolved, ensembl_ids, None).astype(object)
    unresolved = np.flatnonzero(~resolved)
    if len(unresolved):  # usually a handful; all of them only for a panel nothing resolves in
        own_ids = ensembl.take(pa.array(unresolved)).to_pylist()
        own_keys = ids_a.take(pa.array(unresolved)).to_pylist()
        for i, own, key in zip(unresolved, own_ids, own_keys, strict=True):
            if keyed[i]:
                gene_species[i] = key.split(":", 2)[1]
            else:
                if own is not None:  # an Ensembl id outside the reference: its own species,
                    gene_species[i] = ENSEMBL_PREFIX_SPECIES.get(  # and the id names it
                        own[:own.index("0")] if "0" in own else own, panel)
                key = unresolved_key(str(gene_species[i]), own or names_np[i])
            gene_id[i] = key
            index[i] = tail_index(key)
    return pd.DataFrame({
        "gene_id": gene_id, "symbol": symbols.astype(object), "ensembl_id": ensembl_ids,
        "feature": names_np, "species": gene_species, "resolved": resolved, "index": index,
    })


def panel_species_of(genes: pd.DataFrame) -> str | None:
    """The species of a resolved gene table (`resolve_features` output), None when unknown.

    ``mixed`` when resolution found the panel mixed; otherwise the species of most genes.
    """
    if "species" not in genes.columns or genes.empty:
        return None
    species = genes["species"].astype(str)
    if (species == MIXED).any():
        return MIXED
    counts = species[species != UNKNOWN].value_counts()
    if counts.empty or counts.iloc[0] < 0.5 * len(genes):
        return None
    return str(counts.index[0])


def homolog_keys(index: np.ndarray) -> np.ndarray:
    """Column keys of the homolog space: ``-1 - group`` for one-to-one orthologs, else `index`.

    Human and mouse genes of a one-to-one ortholog pair share a key; every other gene (and
    every unresolved key) keeps its own stable index. Keys are int64 and never collide: groups
    are negative, indices are not.
    """
    index = np.asarray(index, dtype=np.int64)
    groups = reference().genes["homolog_group"].to_numpy()
    inside = (index >= 0) & (index < len(groups))
    out = index.copy()
    group = np.full(len(index), -1, dtype=np.int64)
    group[inside] = groups[index[inside]]
    out[group >= 0] = -1 - group[group >= 0]
    return out
