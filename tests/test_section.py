"""Section invariants, section ids, gene keys and the AnnData view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp

from histmol.counts_store import CountsStore
from histmol.errors import ConfigError
from histmol.genes import gene_table, infer_species, merge_duplicate_genes, split_controls
from histmol.section import Provenance, Section, slugify, validate_section_id


def section(**changes: object) -> Section:
    fields: dict[str, object] = dict(
        section_id="crc-01", platform="visium",
        units=pd.DataFrame({"unit_id": ["a", "b", "c"], "x_native": [1.0, 2.0, 3.0],
                            "y_native": [4.0, 5.0, 6.0]}),
        counts=sp.csr_matrix(np.array([[1, 0], [0, 2], [3, 4]], dtype=np.int32)),
        genes=gene_table(["ENSG00000141510", "ENSG00000012048"], ["TP53", "BRCA1"]),
        wsi_path=Path("slide.svs"), unit_shape="circle", unit_size_um=55.0, pitch_um=100.0,
        default_mode="spot", provenance=Provenance("visium", "1", "/data/outs", ("a.h5",)),
        control_counts=pd.DataFrame({"blank": [0, 1, 2]}),
        metadata={"tissue": "colon"},
    )
    fields.update(changes)
    return Section(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["../x", "X", "", "-a", "a/b", "a" * 129, "a..b", ".hidden"])
def test_unsafe_section_ids_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_section_id(bad)


def test_slugify_makes_valid_ids() -> None:
    assert slugify("Breast Cancer L1 (rep 2)") == "breast-cancer-l1-rep-2"
    assert slugify("..") == "section"


def test_section_checks_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="counts shape"):
        section(counts=sp.csr_matrix(np.ones((2, 2), dtype=np.int32)))
    with pytest.raises(ValueError, match="raw integers"):
        section(counts=sp.csr_matrix(np.ones((3, 2))))
    with pytest.raises(ValueError, match="non-negative"):
        section(counts=sp.csr_matrix(-np.ones((3, 2), dtype=np.int32)))
    with pytest.raises(ValueError, match="unit ids are not unique"):
        section(units=pd.DataFrame({"unit_id": ["a", "a", "c"], "x_native": [1.0] * 3,
                                    "y_native": [1.0] * 3}))
    with pytest.raises(ValueError, match="finite"):
        section(units=pd.DataFrame({"unit_id": ["a", "b", "c"], "x_native": [1.0, np.nan, 1.0],
                                    "y_native": [1.0] * 3}))


def test_arrow_backed_unit_ids_are_checked_for_duplicates() -> None:
    """Dense platforms hand Arrow string ids (no Python str per bin); duplicates still fail."""
    def arrow_ids(ids: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"unit_id": pd.arrays.ArrowExtensionArray(pa.array(ids)),
                             "x_native": [1.0] * 3, "y_native": [1.0] * 3})
    assert section(units=arrow_ids(["c", "a", "b"])).n_units == 3
    with pytest.raises(ValueError, match="unit ids are not unique"):
        section(units=arrow_ids(["b", "a", "b"]))


def test_to_anndata_keeps_raw_counts_controls_and_provenance() -> None:
    adata = section().to_anndata()
    assert list(adata.obs_names) == ["a", "b", "c"]
    assert list(adata.var_names) == ["ENSG00000141510", "ENSG00000012048"]
    np.testing.assert_array_equal(adata.X.toarray(), [[1, 0], [0, 2], [3, 4]])
    np.testing.assert_array_equal(adata.obs["control_blank"], [0, 1, 2])
    np.testing.assert_array_equal(adata.obsm["spatial"], [[1, 4], [2, 5], [3, 6]])
    assert adata.uns["histmol"]["provenance"]["files"] == ["a.h5"]
    assert adata.var.loc["ENSG00000141510", "symbol"] == "TP53"


def test_a_section_on_a_counts_store_reads_like_one_in_memory() -> None:
    """Dense platforms keep rows on disk; the pipeline reads them through the same two calls."""
    matrix = sp.csr_matrix(np.array([[1, 0], [0, 2], [3, 4]], dtype=np.int32))
    store = CountsStore(3, 2)
    store.write_rows(np.array([2, 0]), matrix[[2, 0]])
    store.write_rows(np.array([1]), matrix[[1]])
    on_disk, in_memory = section(counts=store.finish()), section()
    for rows in ([2, 0, 1], [1], []):
        rows_ = np.array(rows, np.int64)
        np.testing.assert_array_equal(on_disk.count_rows(rows_).toarray(),
                                      in_memory.count_rows(rows_).toarray())
    assert on_disk.counts.sum() == in_memory.counts.sum() == 10
    np.testing.assert_array_equal(on_disk.to_anndata().X.toarray(), matrix.toarray())
    with pytest.raises(ValueError, match="counts shape"):
        section(counts=CountsStore(2, 2))


def test_gene_keys_controls_and_duplicates() -> None:
    genes = gene_table(
        ["ENSMUSG00000064339.1", "Gad1", "NegControlProbe_00042", "BLANK_0006", "Gad1"],
        ["mt-Rnr2", "Gad1", "NegControlProbe_00042", "BLANK_0006", "Gad1"],
    )
    # ids and symbols resolve to the reference: Gad1 by its current symbol
    assert genes["gene_id"].tolist()[:2] == ["ENSMUSG00000064339", "ENSMUSG00000070880"]
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4, 5], [0, 1, 0, 7, 1]], dtype=np.int32))
    kept, kept_counts, controls = split_controls(genes, counts)
    assert kept["gene_id"].tolist() == ["ENSMUSG00000064339", "ENSMUSG00000070880"] * 1 + [
        "ENSMUSG00000070880"]
    assert controls.to_dict("list") == {"blank": [4, 7], "negative_probe": [3, 0]}
    merged, merged_counts = merge_duplicate_genes(kept, kept_counts)
    assert merged["gene_id"].tolist() == ["ENSMUSG00000064339", "ENSMUSG00000070880"]
    np.testing.assert_array_equal(merged_counts.toarray(), [[1, 7], [0, 2]])
    assert infer_species(merged) == "mouse"
    # the panel's one Ensembl id names its species; A and B stay unresolved mouse keys
    one_id = gene_table(["ENSMUSG00000064339", "zzA", "zzB"], ["x", "zzA", "zzB"])
    assert infer_species(one_id) == "mouse"
    assert one_id["gene_id"].tolist()[1:] == ["unresolved:mouse:zzA", "unresolved:mouse:zzB"]
    assert infer_species(gene_table(["zzA", "zzB"], ["zzA", "zzB"])) is None  # no evidence


def test_file_errors_survive_pickling() -> None:
    import pickle

    from histmol.errors import BundleError

    error = pickle.loads(pickle.dumps(BundleError("/data/outs/x.h5", "truncated")))
    assert isinstance(error, BundleError) and str(error) == "/data/outs/x.h5: truncated"
    assert (error.path, error.problem) == ("/data/outs/x.h5", "truncated")


def test_cohort_names_are_lower_cased_and_other_ids_refused_with_a_legible_rule() -> None:
    from histmol.section import normalise_section_id

    assert normalise_section_id("B4") == "b4" and normalise_section_id("MOB1_rep.2") == "mob1_rep.2"
    with pytest.raises(ConfigError) as info:
        normalise_section_id("B 4")
    message = str(info.value)
    assert "'B 4' is not a safe slug" in message and "[a-z0-9][a-z0-9._-]{0,127}" in message
    assert "lowercase letters, digits" in message
