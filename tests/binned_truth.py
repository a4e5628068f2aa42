"""Checks a corpus built from a synthetic bead/spot-array bundle against its ground truth.

Shared by the platforms whose adapters bin fine capture spots into 8 um squares in H&E pixels
(hdst, open-st): every stored unit must be exactly the sum of the truth's spots in its square,
at the square's centre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp
from gene_space_helpers import truth_columns

from histmol.synth import GroundTruth


def assert_binned_corpus_exact(truth: GroundTruth, out: Path, bin_px: float) -> pd.Series:
    """Assert unit positions and counts of the one section in `out`; return its sections row."""
    col = np.floor(truth.x_native / bin_px).astype(int)
    row = np.floor(truth.y_native / bin_px).astype(int)
    codes, ids = pd.factorize(pd.Series([f"c{c}_r{r}" for c, r in zip(col, row, strict=True)]))
    summing = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))))
    expected = np.asarray((summing @ truth.counts).todense(), dtype=np.int64)
    first = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    manifest = pd.read_parquet(out / "manifest.parquet")
    units = pd.concat([pq.read_table(out / p).to_pandas() for p in manifest["units_path"]])
    section = pd.read_parquet(out / "sections.parquet").iloc[0]
    assert len(units) + section["qc_n_units_dropped_tissue"] == len(ids)
    where = pd.Series(np.arange(len(ids)), index=ids).loc[units["unit_id"]].to_numpy()
    np.testing.assert_allclose(units["x_wsi_px"], (col[first][where] + 0.5) * bin_px, atol=1e-9)
    np.testing.assert_allclose(units["y_wsi_px"], (row[first][where] + 0.5) * bin_px, atol=1e-9)
    symbols = truth.genes["symbol"]
    column = truth_columns(symbols, symbols)  # stable gene index -> truth column (by symbol)
    got = np.zeros((len(units), len(truth.genes)), np.int64)
    for i, (genes, values) in enumerate(zip(units["gene_idx"], units["counts"], strict=True)):
        got[i, column.loc[np.asarray(genes)].to_numpy()] = values
    np.testing.assert_array_equal(got, expected[where])
    return section
