"""benchmarks/bench_gpu_feed.py runs end to end on CPU at tiny sizes and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_feed.py"


@pytest.mark.slow
def test_gpu_feed_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu_feed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "feed.json"
    module.main(["--out", str(out), "--workdir", str(tmp_path), "--pairs", "64",
                 "--sections", "2", "--patch-px", "32", "--batch-size", "8", "--workers", "0,1",
                 "--steps", "2", "--warmup", "1", "--encoder", "resnet18", "--width", "8",
                 "--device", "cpu"])
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["genes"] == 2000 and result["amp"] == "off"
    runs = [(r["mode"], r["workers"]) for r in result["runs"]]
    assert runs == [("batched", 0), ("per_sample", 0), ("batched", 1), ("per_sample", 1)]
    for run in result["runs"]:
        assert run["pairs_per_s"] == pytest.approx(8 * run["steps_per_s"])
        assert 0 < run["gpu_busy_fraction"] <= 1
    assert (tmp_path / "corpus-64-32px" / "corpus.json").exists()
