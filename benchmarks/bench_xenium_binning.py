"""Xenium transcript binning throughput (transcripts/s) and peak memory, at any section size.

Writes a synthetic `transcripts.parquet` in XOA's schema (feature_name, x/y/z_location in um, qv,
cell_id, ...; 1 M rows per row group; ~4 % control codewords, ~8 % under Q20) over a square
section, then times `platform_adapters.xenium.read(..., units="bins")` in a fresh child process
so that generating the file does not count in its peak RSS (ru_maxrss). Running it at two sizes
shows whether memory grows with the number of transcripts (it should follow the non-empty
(bin, gene) pairs only). JSON goes to benchmarks/results/. Run by hand, e.g.:

    .venv/bin/python benchmarks/bench_xenium_binning.py --transcripts 20000000 --bin-um 8
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROW_GROUP = 1 << 20
N_GENES, N_CONTROLS = 480, 20
DENSITY_PER_UM2 = 0.5  # transcripts per um^2 of section, typical of 300-500-gene panels


def peak_rss_mb() -> float:
    """Return the peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_transcripts(path: Path, n: int, side_um: float, seed: int) -> None:
    """XOA-like transcripts.parquet, written one row group at a time (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = np.array([f"GENE{i:04d}" for i in range(N_GENES)]
                     + [f"NegControlCodeword_{i:04d}" for i in range(N_CONTROLS)])
    weights = np.concatenate([np.random.default_rng(1).lognormal(0, 1.2, N_GENES),
                              np.full(N_CONTROLS, 0.5)])
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    schema = None
    with tempfile.TemporaryDirectory():
        writer = None
        for start in range(0, n, ROW_GROUP):
            size = min(ROW_GROUP, n - start)
            # clustered like cells: centres on a 10 um grid, transcripts within 5 um
            centre = rng.integers(0, int(side_um / 10), (size, 2)) * 10.0 + 5.0
            xy = (centre + rng.normal(0, 2.5, (size, 2))).clip(0, side_um - 1e-3)
            table = pa.table({
                "transcript_id": pa.array(np.arange(start, start + size, dtype=np.uint64)),
                "cell_id": pa.array(np.full(size, "UNASSIGNED")),
                "overlaps_nucleus": pa.array(np.zeros(size, np.uint8)),
                "feature_name": pa.array(names[rng.choice(len(names), size, p=weights)]),
                "x_location": pa.array(xy[:, 0].astype(np.float32)),
                "y_location": pa.array(xy[:, 1].astype(np.float32)),
                "z_location": pa.array(rng.uniform(5, 25, size).astype(np.float32)),
                "qv": pa.array(np.where(rng.random(size) < 0.08, 10.0, 35.0).astype(np.float32)),
            })
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP)
        assert writer is not None
        writer.close()


def child(args: argparse.Namespace) -> None:
    """Bin the transcripts in this fresh process; print one JSON line."""
    from platform_adapters import xenium

    started = time.perf_counter()
    section = xenium.read(args.bundle, wsi="he.tif", units="bins", bin_um=args.bin_um,
                          native_to_wsi=np.eye(3))
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "bins": section.n_units, "nnz": int(section.counts.nnz),
                      "n_transcripts": section.qc["n_transcripts"], "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    """Generate the transcripts, bin them in a child process, write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcripts", type=int, default=20_000_000)
    parser.add_argument("--side-um", type=float, default=0.0,
                        help="section side; default: 0.5 transcripts per um^2, like XOA panels")
    parser.add_argument("--bin-um", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated bundle")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    side = args.side_um or float(np.sqrt(args.transcripts / DENSITY_PER_UM2))
    with tempfile.TemporaryDirectory(prefix="bench-xenium-") as tmp:
        bundle = (args.workdir or Path(tmp)) / "xenium_outs"
        bundle.mkdir(parents=True, exist_ok=True)
        path = bundle / "transcripts.parquet"
        started = time.perf_counter()
        if not path.exists():
            write_transcripts(path, args.transcripts, side, args.seed)
        generate_s = time.perf_counter() - started
        run = subprocess.run(
            [sys.executable, __file__, "--child", "--bundle", str(bundle),
             "--bin-um", str(args.bin_um)],
            check=True, capture_output=True, text=True,
        )
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        file_mb = path.stat().st_size / 2**20
    result = {
        "benchmark": "xenium_transcript_binning",
        "transcripts": measured["n_transcripts"],
        "section_side_um": side,
        "bin_um": args.bin_um,
        "bins": measured["bins"],
        "nonzero_bin_gene_pairs": measured["nnz"],
        "parquet_mb": round(file_mb, 1),
        "generate_s": round(generate_s, 2),
        "bin_wall_s": round(measured["wall_s"], 2),
        "transcripts_per_s": round(measured["n_transcripts"] / measured["wall_s"]),
        "peak_rss_mb": round(measured["peak_rss_mb"], 1),
        "machine": {"python": platform.python_version(), "cpu": platform.processor(),
                    "cores": __import__("os").cpu_count()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"xenium_binning_{args.transcripts}_{args.bin_um:g}um.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
