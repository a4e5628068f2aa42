"""The shipped gene reference, and resolution of a panel's features to it.

Why: a gene must be one gene whatever the bundle calls it (Ensembl id, current symbol, previous
symbol or alias, R-mangled name) so that every platform and both species meet in one gene space.
The reference (``histmol/reference/``, built offline by ``scripts/build_gene_reference.py``; no
download at run time) holds every human and mouse Ensembl gene of its sources in a fixed row
order: a gene's row is its stable global index. Features that resolve to no single reference
gene are kept under the key ``unresolved:<species>:<name>`` with the index
``TAIL_BASE + (first 30 bits of sha256(key))``: stable, order-free and above every reference
index. Two different keys hashing to one index are a CorpusError when they meet in a corpus
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
import pyarrow.parquet as pq

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
TAIL_BASE = 1 << 30
UNRESOLVED = "unresolved"
MIXED, UNKNOWN = "mixed", "unknown"
REFERENCE_SPECIES = ("human", "mouse")
ENSEMBL_ID = r"(ENS[A-Z]*G\d{11})(?:\.\d+)?"
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
    ensembl: pd.Index  # ensembl ids in row order
    exact: dict[str, pd.Series]  # species -> name -> index (symbols, then aliases)
    folded: dict[str, pd.Series]  # species -> upper-case name -> index, where unambiguous


@functools.cache
def reference() -> Reference:
    """The shipped reference, read once per process."""
    table = pq.read_table(REFERENCE_DIR / "genes.parquet")
    version = table.schema.metadata[b"histmol_reference"].decode()
    genes = table.to_pandas()
    names = pq.read_table(REFERENCE_DIR / "names.parquet").to_pandas()
    exact, folded = {}, {}
    for species in REFERENCE_SPECIES:
        rows = names[names["species"] == species]
        for out, kinds in ((exact, ("symbol", "alias")), (folded, ("folded",))):
            chosen = rows[rows["kind"].isin(kinds)]  # the build keeps each kind's names unique
            out[species] = pd.Series(chosen["index"].to_numpy(np.int64),
                                     index=pd.Index(chosen["name"].to_numpy(object)))
    return Reference(version, genes, pd.Index(genes["ensembl_id"].to_numpy()), exact, folded)


def unresolved_key(species: str, name: str) -> str:
    """The explicit key of a feature that resolves to no reference gene."""
    return f"{UNRESOLVED}:{species}:{name}"


def tail_index(key: str) -> int:
    """The stable index of an unresolved key: TAIL_BASE + 30 bits of its sha256."""
    digest = hashlib.sha256(key.encode()).digest()
    return TAIL_BASE + (int.from_bytes(digest[:4], "big") >> 2)


def _ensembl(values: pd.Series) -> pd.Series:
    """The unversioned Ensembl gene id of each value, None where it is none."""
    found = values.str.extract(f"^{ENSEMBL_ID}$", expand=False)
    return found.astype(object).where(found.notna(), None)


def _lookup(table: pd.Series, names: pd.Series) -> np.ndarray:
    """Indices of `names` in a name -> index Series, -1 where absent."""
    at = table.index.get_indexer(names.to_numpy(dtype=object))
    out = np.full(len(names), -1, dtype=np.int64)
    out[at >= 0] = table.to_numpy()[at[at >= 0]]
    return out


def _r_unmangled(names: pd.Series) -> pd.Series:
    """Undo R's make.names: dots for dashes, an X before a leading digit."""
    return names.str.replace(".", "-", regex=False).str.replace(r"^X(?=\d)", "", regex=True)


def panel_species(ensembl: pd.Series, names: pd.Series) -> str:
    """``human``, ``mouse``, ``mixed`` or ``unknown`` from a panel's ids and names."""
    has_id = ensembl.notna().to_numpy()
    prefixes = ensembl[has_id].astype(str).str.extract(r"^(ENS[A-Z]*G)\d", expand=False)
    counts = prefixes.map(ENSEMBL_PREFIX_SPECIES).value_counts()
    # features without an id: which species' names (exact case) they are
    ref = reference()
    hits = {s: _lookup(ref.exact[s], names[~has_id]) >= 0 for s in REFERENCE_SPECIES}
    for species, other in (("human", "mouse"), ("mouse", "human")):
        counts[species] = counts.get(species, 0) + int((hits[species] & ~hits[other]).sum())
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
    """
    ref = reference()
    ids_s = pd.Series(np.asarray(ids, dtype=object)).astype(str).str.strip()
    names_s = pd.Series(np.asarray(names, dtype=object)).astype(str).str.strip()
    names_s = names_s.where(names_s != "", ids_s)
    keyed = ids_s.str.startswith(f"{UNRESOLVED}:").to_numpy()
    ensembl = _ensembl(ids_s)
    ensembl = ensembl.where(ensembl.notna(), _ensembl(names_s))
    panel = species or panel_species(ensembl[~keyed], names_s[~keyed])
    at = ref.ensembl.get_indexer(ensembl.fillna("").to_numpy(dtype=object))
    index = np.where(keyed, -1, at).astype(np.int64)
    if panel in REFERENCE_SPECIES:
        for candidates in (names_s, _r_unmangled(names_s)):
            for table, key in ((ref.exact[panel], candidates),
                               (ref.folded[panel], candidates.str.upper())):
                todo = (index < 0) & ~keyed & ensembl.isna().to_numpy()
                if todo.any():
                    index[todo] = _lookup(table, key[todo])
    resolved = index >= 0
    genes = ref.genes
    rows = np.where(resolved, index, 0)
    gene_species = np.where(resolved, genes["species"].to_numpy()[rows], panel).astype(object)
    ensembl_ids = np.where(resolved, genes["ensembl_id"].to_numpy()[rows], None)
    ref_symbols = genes["symbol"].to_numpy()[rows]
    symbols = np.where(resolved & pd.notna(ref_symbols), ref_symbols, names_s.to_numpy(object))
    gene_id = np.where(resolved, ensembl_ids, None).astype(object)
    for i in np.flatnonzero(~resolved):  # unresolved features only: usually a handful
        if keyed[i]:
            key = ids_s.iat[i]
            gene_species[i] = key.split(":", 2)[1]
        else:
            own = ensembl.iat[i]
            if isinstance(own, str):  # an Ensembl id outside the reference: its own species
                gene_species[i] = ENSEMBL_PREFIX_SPECIES.get(
                    own[:own.index("0")] if "0" in own else own, panel)
            key = unresolved_key(str(gene_species[i]), names_s.iat[i])
        gene_id[i] = key
        index[i] = tail_index(key)
    return pd.DataFrame({
        "gene_id": gene_id, "symbol": symbols.astype(object), "ensembl_id": ensembl_ids,
        "feature": names_s.to_numpy(object), "species": gene_species, "resolved": resolved,
        "index": index,
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
