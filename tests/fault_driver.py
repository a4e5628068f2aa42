"""A light ingest for the fault-injection suite: every stage of a build, no Prefect.

``python fault_driver.py MANIFEST OUT [--force] [--die-at MODULE:NAME:N]`` loads the manifest,
removes debris of killed runs, then per entry runs `build_section` (read, register, tissue, plan,
write parts, commit; failures recorded) and draws its QC figures, as the ingest flow does.
``--die-at`` replaces ``MODULE.NAME`` (a function) with one that SIGKILLs this process on its
N-th call, before running it: a kill -9 at an exact point (a step of the commit, a table write).
Exit status 1 when a section failed, as `histmol ingest`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def die_at(spec: str) -> None:
    """Make the N-th call of MODULE:NAME kill this process with SIGKILL."""
    module_name, name, n = spec.split(":")
    module = importlib.import_module(module_name)
    real: Callable[..., Any] = getattr(module, name)
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, name, dying)


def main() -> int:
    """Ingest a manifest into a local corpus with the library's plain functions."""
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--die-at", action="append", default=[])
    args = parser.parse_args()
    from histmol.build import build_section
    from histmol.errors import HistmolError
    from histmol.manifest import load_manifest
    from histmol.qc.figures import FIGURE_NAMES, write_section_figures
    from histmol.shards.corpus import Corpus

    for spec in args.die_at:
        die_at(spec)
    plan = load_manifest(args.manifest)
    Corpus.open(args.out, create=True, build_config=plan.corpus_fields).cleanup_staging()
    failed = 0
    for request, config in zip(plan.requests, plan.configs, strict=True):
        section_id = request.resolved_section_id()
        try:
            result = build_section(request, args.out, config, force=args.force, threads=1,
                                   record_failure=True)
        except HistmolError as error:
            print(f"{section_id}: failed: {error}", file=sys.stderr)
            failed += 1
            continue
        figures = args.out / "qc" / section_id
        drawn = {p.name for p in figures.glob("*.png")} if figures.is_dir() else set()
        if result.status == "committed" or len(drawn) < len(FIGURE_NAMES):  # a kill while drawing
            write_section_figures(args.out, section_id, args.out / "qc", slide=request.wsi)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
