"""Loader pairs/s on an existing corpus with the decoded-units cache off, cold and warm.

Dense platforms store many units a pair, so decoding a part's units parquet can cost more than
the pair's JPEG; histmol.data.units_cache decodes each part once per machine and lets every
worker memory-map the result. This runs PairDataset (batched, ``aggregate_units=True``, all
genes) through StatefulDataLoader over every pair of `--corpus` for each worker count: with
``units_cache_bytes=0`` (every worker decodes what it opens), with an emptied cache (``cold``:
the first process to need a part decodes it) and with the cache that run left (``warm``). Times
include opening the loader (workers start, parts open), since that is where decoding happens;
an untimed pass first leaves the image check markers in place for all of them.
Writes JSON to benchmarks/results/units_cache_<time>.json. Run by hand on a dense corpus, e.g.
the one bench_visium_hd.py builds (--workdir keeps it):

    .venv/bin/python benchmarks/bench_units_cache.py --corpus /path/to/corpus --workers 0,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(corpus: Path, workers: int, cache_dir: Path, cache_bytes: int, batch_size: int) -> dict:
    """One pass over the corpus; pairs/s from building the loader to the last batch."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from histmol.data import PairDataset, pair_collate

    started = time.perf_counter()
    ds = PairDataset(corpus, genes="all", seed=0, batch_size=batch_size, batched=True,
                     aggregate_units=True, cache_dir=cache_dir, units_cache_bytes=cache_bytes)
    loader = StatefulDataLoader(ds, batch_size=None, num_workers=workers, collate_fn=pair_collate,
                                prefetch_factor=4 if workers else None)
    pairs = sum(len(batch["index"]) for batch in loader)
    elapsed = time.perf_counter() - started
    return {"workers": workers, "pairs": pairs, "seconds": elapsed, "pairs_per_s": pairs / elapsed}


def main() -> None:
    """Run every (worker count, cache state) pass and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    import pyarrow.parquet as pq

    manifest = pq.read_table(args.corpus / "manifest.parquet").to_pandas()
    result: dict = {
        "corpus": str(args.corpus), "parts": len(manifest),
        "pairs": int(manifest["n_pairs"].sum()), "units": int(manifest["n_units"].sum()),
        "units_parquet_bytes": int(manifest["units_bytes"].sum()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg": os.getloadavg()},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="histmol-bench-units-") as tmp:
        cache = Path(tmp)
        # untimed: images are hashed once per machine (markers in the cache), for every state
        result["warm_up"] = run(args.corpus, 0, cache, 0, args.batch_size)
        for workers in (int(w) for w in args.workers.split(",")):
            for state in ("off", "cold", "warm"):
                if state == "cold":
                    shutil.rmtree(cache / "units", ignore_errors=True)
                cache_bytes = 0 if state == "off" else 16 << 30
                entry = {"units_cache": state,
                         **run(args.corpus, workers, cache, cache_bytes, args.batch_size)}
                print(json.dumps(entry), flush=True)
                result["runs"].append(entry)
    out = args.out or RESULTS / f"units_cache_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
