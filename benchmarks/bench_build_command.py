"""Time the real `histmol build` command, as a whole process, on a synthetic Visium section.

The section is the one of issue 19: a 6 x 6 mm pyramidal slide at 0.25 um/px (24,000 px side,
~2,690 Visium spots) and its Space Ranger bundle, generated with histmol.synth (about 2 minutes;
pass --workdir to keep and reuse them). Measured, each in its own child process so the numbers
are the whole process's (os.wait4 rusage: user+sys CPU, peak RSS):

- `histmol build ...` (the command a user runs): wall, CPU, peak RSS, and the build time the
  command reports for itself ("... MB in N s"), whose ratio to the wall is the orchestration;
- the library path, `histmol.build.build_section` from a plain script: the same, plus the
  BuildResult's stage timings (read/resample are summed over the tile threads);
- import time: `python -X importtime -c "import histmol.cli"` and `import histmol.build`
  (cumulative microseconds of the top module), and the wall of `histmol --help`;
- with --hest-python, the peer (HEST, installed in its own venv) cutting the same patches; its
  CPU then replaces the 33 s figure of issue 19 in the `cpu_vs_peer` ratios.

The machine's load average is recorded before and after: on a shared machine prefer the CPU
numbers over the wall ones. JSON goes to benchmarks/results/build_command_<time>.json. Run by hand:

    .venv/bin/python benchmarks/bench_build_command.py [--workdir /tmp/bench] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SIDE_UM = 6000.0  # 24,000 px at 0.25 um/px
PEER_CPU_S = 33.0  # HEST cutting the same section's patches on this machine (issue 19)
HEST_SCRIPT = """
import sys
from hest.readers import VisiumReader
outs, wsi, dest = sys.argv[1:4]
st = VisiumReader().read(wsi, filtered_bc_matrix_path=f"{outs}/filtered_feature_bc_matrix.h5",
                         spatial_coord_path=f"{outs}/spatial", autoalign="never")
st.segment_tissue(method="otsu")
st.dump_patches(dest, name="patches", target_patch_size=224, target_pixel_size=0.5,
                dump_visualization=False)
"""
LIBRARY_SCRIPT = """
import json, sys, time
from pathlib import Path
from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
bundle, wsi, transform, out, threads = sys.argv[1:6]
request = SectionRequest("visium", Path(bundle), Path(wsi), "bench", Path(transform))
result = build_section(request, Path(out), BuildConfig(), threads=int(threads))
print(json.dumps({"status": result.status, "n_pairs": result.n_pairs, "seconds": result.seconds,
                  "timings": result.timings}))
"""


def inputs(work: Path) -> dict[str, Path]:
    """Generate (or reuse) the slide and the Visium bundle under `work`."""
    slide_path, bundle_dir = work / "slide.tif", work / "visium"
    done = work / "inputs.json"
    if done.exists():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    from histmol.synth import make_slide, write_visium_bundle

    work.mkdir(parents=True, exist_ok=True)
    slide = make_slide(slide_path, width_um=SIDE_UM, height_um=SIDE_UM, mpp=0.25, seed=0,
                       n_regions=4)
    truth = write_visium_bundle(bundle_dir, slide, seed=0, n_genes=500)
    paths = {"wsi": slide.path, "bundle": truth.bundle, "transform": truth.transform_path}
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def run_child(command: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run one child process; its wall, user+sys CPU and peak RSS (from os.wait4), and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {
        "returncode": child.returncode,
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "user_s": round(usage.ru_utime, 3),
        "sys_s": round(usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stdout": stdout,
        "stderr": stderr,
    }


def import_us(python: str, module: str, env: dict[str, str]) -> int:
    """Cumulative import time of `module` in microseconds, from `-X importtime`."""
    done = subprocess.run([python, "-X", "importtime", "-c", f"import {module}"], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    for line in reversed(done.stderr.splitlines()):
        fields = [f.strip() for f in line.removeprefix("import time:").split("|")]
        if len(fields) == 3 and fields[2] == module:
            return int(fields[1])
    raise RuntimeError(f"no import time line for {module}: {done.stderr[-500:]}")


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The run without its full output (the tail of stderr is kept when it failed)."""
    kept = {k: v for k, v in run.items() if k not in ("stdout", "stderr")}
    if run["returncode"] != 0:
        kept["stderr_tail"] = run["stderr"][-2000:]
    return kept


def main() -> None:
    """Generate the inputs, time import, the command and the library path, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated slide and bundle here and reuse them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--skip-command", action="store_true",
                        help="time only import and the library path")
    parser.add_argument("--hest-python", default=None,
                        help="python of a venv with HEST installed (see /work/shared/STACK.md): "
                             "time it cutting the same patches, as the peer of this run")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="histmol-bench-command-"))
    python = sys.executable
    histmol_exe = str(Path(python).with_name("histmol"))
    env = dict(os.environ)
    # While `histmol build` starts Prefect's temporary server: a private PREFECT_HOME (other
    # commands on this machine must not share its database) and a start limit for a busy machine.
    env.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    started = time.perf_counter()
    paths = inputs(work)
    generate_s = time.perf_counter() - started
    report: dict[str, Any] = {
        "benchmark": "build_command",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": [round(v, 2) for v in os.getloadavg()]},
        "section": {"slide_px": round(SIDE_UM / 0.25), "mpp": 0.25, "generate_s":
                    round(generate_s, 1)},
        "threads": args.threads,
        "peer_cpu_s": PEER_CPU_S,
    }
    report["import"] = {
        "histmol_cli_us": import_us(python, "histmol.cli", env),
        "histmol_build_us": import_us(python, "histmol.build", env),
        "help": summary(run_child([histmol_exe, "--help"], env, 300)),
    }

    for name in ("corpus-library", "corpus-command"):  # left by an interrupted run
        shutil.rmtree(work / name, ignore_errors=True)
    library = run_child(
        [python, "-c", LIBRARY_SCRIPT, str(paths["bundle"]), str(paths["wsi"]),
         str(paths["transform"]), str(work / "corpus-library"), str(args.threads)],
        env, args.timeout_s,
    )
    shutil.rmtree(work / "corpus-library", ignore_errors=True)
    report["library"] = summary(library)
    if library["returncode"] == 0:
        result = json.loads(library["stdout"].strip().splitlines()[-1])
        report["library"].update(
            status=result["status"], n_pairs=result["n_pairs"], build_s=round(result["seconds"], 3),
            stage_s={k: round(v, 3) for k, v in result["timings"].items()},
            cpu_vs_peer=round(library["cpu_s"] / PEER_CPU_S, 3),
        )

    if not args.skip_command:
        command = [histmol_exe, "build", "--platform", "visium", "--bundle", str(paths["bundle"]),
                   "--wsi", str(paths["wsi"]), "--transform", str(paths["transform"]),
                   "--out", str(work / "corpus-command"), "--section-id", "bench",
                   "--threads", str(args.threads)]
        built = run_child(command, env, args.timeout_s)
        shutil.rmtree(work / "corpus-command", ignore_errors=True)
        report["command"] = summary(built)
        reported = re.search(r"committed: ([\d,]+) pairs.* in ([\d.]+) s", built["stdout"])
        if built["returncode"] == 0 and reported:
            build_s = float(reported.group(2))
            report["command"].update(
                n_pairs=int(reported.group(1).replace(",", "")),
                reported_build_s=build_s,
                wall_vs_reported_build=round(built["wall_s"] / max(build_s, 1e-9), 3),
                cpu_vs_peer=round(built["cpu_s"] / PEER_CPU_S, 3),
            )
    if args.hest_python:
        shutil.rmtree(work / "hest-patches", ignore_errors=True)
        hest = run_child([args.hest_python, "-c", HEST_SCRIPT, str(paths["bundle"]),
                          str(paths["wsi"]), str(work / "hest-patches")],
                         {k: v for k, v in env.items() if k != "PYTHONPATH"}, args.timeout_s)
        shutil.rmtree(work / "hest-patches", ignore_errors=True)
        report["peer_hest"] = summary(hest)
        if hest["returncode"] == 0:
            report["peer_cpu_s"] = hest["cpu_s"]
            for name in ("library", "command"):
                if "cpu_vs_peer" in report.get(name, {}):
                    report[name]["cpu_vs_peer"] = round(report[name]["cpu_s"] / hest["cpu_s"], 3)
    report["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"build_command_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written to {path}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
