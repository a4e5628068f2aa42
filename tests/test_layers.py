"""The import contract: a lower layer never imports a higher one (AST-based, no dependency).

Layers, low to high (histmol/__init__.py says the same): core -> geometry and adapters ->
storage -> data, model -> pipeline -> flows -> app. Modules stay where they are (folders do not
move); this map places each one. A new module must be placed here, or this test fails. Every
import counts, including those inside functions (lazy imports are still dependencies).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE, GEOMETRY, STORAGE, DATA, PIPELINE, FLOWS, APP = range(7)
LAYER_NAMES = ("core", "geometry/adapters", "storage", "data/model", "pipeline", "flows", "app")
# longest prefix wins
LAYERS = {
    "histmol": CORE, "histmol.section": CORE, "histmol.config": CORE, "histmol.errors": CORE,
    "histmol.genes": CORE, "histmol.fingerprint": CORE, "histmol.progress": CORE,
    "histmol.counts_store": CORE, "histmol.gene_reference": CORE, "histmol.split": CORE,
    "histmol.manifest_limits": CORE, "histmol.parallel_map": CORE, "histmol.options": CORE,
    "histmol.autoregister": GEOMETRY, "histmol.synth.scale": STORAGE,
    "histmol.registration": GEOMETRY, "histmol.landmarks": GEOMETRY, "histmol.binning": GEOMETRY,
    "histmol.tissue": GEOMETRY, "histmol.tiling": GEOMETRY, "histmol.pairs": GEOMETRY,
    "histmol.wsi": GEOMETRY, "histmol.synth": GEOMETRY, "platform_adapters": GEOMETRY,
    "histmol.shards": STORAGE, "histmol.shards.publish": STORAGE, "histmol.remote_inputs": STORAGE,
    "histmol.data": DATA, "histmol.model": DATA, "histmol.qc": DATA, "histmol.export": DATA,
    "histmol.summary": DATA, "histmol.validate": DATA,
    "histmol.build": PIPELINE, "histmol.manifest": PIPELINE, "histmol.auto_placement": PIPELINE,
    "histmol.preflight": PIPELINE,
    "flows": FLOWS,
    "histmol.cli": APP, "histmol.__main__": APP, "histmol.demo": APP, "histmol.ingest_view": APP,
    "histmol.cli_errors": APP, "histmol.progress_view": APP, "histmol.cli_options": APP,
}
PACKAGES = ("histmol", "platform_adapters", "flows")


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str) -> set[str]:
    """Absolute names of the project modules `path` imports (relative imports resolved)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodule imports
    return {name for name in found if name.split(".")[0] in PACKAGES}


def test_no_module_imports_a_higher_layer() -> None:
    unplaced, violations = [], []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = module_name(path)
            own = layer_of(module)
            if own is None:
                unplaced.append(module)
                continue
            for name in sorted(imports(path, module)):
                other = layer_of(name)
                if other is not None and other > own:
                    violations.append(f"{module} ({LAYER_NAMES[own]}) imports {name} "
                                      f"({LAYER_NAMES[other]})")
    assert unplaced == [], f"place these modules in tests/test_layers.py LAYERS: {unplaced}"
    assert violations == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from flows.ingest import run_ingest\n")
    assert "flows.ingest" in imports(bad, "histmol.shards.bad")
    assert layer_of("flows.ingest") > layer_of("histmol.shards.bad")  # type: ignore[operator]


def test_the_cli_and_the_build_import_no_prefect_torch_or_dask() -> None:
    code = ("import sys, histmol.cli, histmol.build, histmol.demo; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'prefect', 'torch', 'dask', 'distributed', 'spatialdata', 'anndata', 'timm'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True, env={"PYTHONPATH": str(REPO),
                                                        "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-X", "importtime", "-m", "histmol", "--help"],
                            cwd=REPO, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in helped.stderr.splitlines()
              if line.startswith("import time:")}
    assert "Usage" in helped.stdout and not loaded & {"prefect", "torch", "dask"}
