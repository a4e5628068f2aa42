"""Each option is declared once; the configs' checks, the manifest and the CLI derive from it.

These tests fail when a copy reappears: a CLI option or manifest field that is not a spec, a
spec's help or default that the CLI or the schema does not show, or a bound one of the three
enforces differently.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import REPO_ROOT
from typer.testing import CliRunner

from histmol.cli import app
from histmol.config import BUILD_OPTIONS, CORPUS_LEVEL_FIELDS, BuildConfig
from histmol.errors import ConfigError
from histmol.manifest import (
    METADATA_FIELDS,
    PATH_FIELDS,
    PLATFORM_OPTION_FIELDS,
    REQUEST_PATH_FIELDS,
    ManifestError,
    json_schema,
    load_manifest,
)
from histmol.model.config import TRAIN_OPTIONS, TrainConfig
from histmol.options import (
    ADAPTER,
    CORPUS,
    EXTRA,
    INPUT,
    METADATA,
    REQUIRED,
    SECTION,
    SECTION_FIELDS,
    THREADS,
    OptionSpec,
    named,
    scoped,
)

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def cli_params(command: str) -> dict[str, Any]:
    """A command's parameters by name (--help excluded)."""
    return {p.name: p for p in COMMANDS[command].params if p.name != "help"}  # type: ignore[misc]


def test_every_config_field_has_exactly_one_spec() -> None:
    for config, specs in ((BuildConfig, BUILD_OPTIONS), (TrainConfig, TRAIN_OPTIONS)):
        fields = dataclasses.fields(config)
        assert [f.name for f in fields] == [s.name for s in specs]
        assert [f.default for f in fields] == [s.default for s in specs]
    names = [s.name for s in (*BUILD_OPTIONS, *SECTION_FIELDS)]
    assert len(names) == len(set(names)), "a section option is declared twice"
    assert {s.scope for s in BUILD_OPTIONS} == {CORPUS, SECTION}
    assert {s.scope for s in SECTION_FIELDS} == {INPUT, METADATA, ADAPTER, EXTRA}
    assert all(s.help.strip() for s in (*BUILD_OPTIONS, *SECTION_FIELDS, *TRAIN_OPTIONS))


def test_derived_field_lists() -> None:
    assert CORPUS_LEVEL_FIELDS == ("patch_px", "target_mpp", "resample", "jpeg_quality")
    assert METADATA_FIELDS == ("tissue", "species", "patient_id", "licence")
    assert PLATFORM_OPTION_FIELDS == ("bin_um", "units", "alignment")
    # in this order: a URL-input request's fingerprint hashes its inputs in it
    assert REQUEST_PATH_FIELDS == ("bundle", "wsi", "transform", "landmarks")
    assert PATH_FIELDS == (*REQUEST_PATH_FIELDS, "alignment")
    assert BuildConfig(patch_px=64).corpus_fields() == {
        "patch_px": 64, "target_mpp": 0.5, "resample": "lanczos", "jpeg_quality": 90}


def test_fingerprints_are_those_corpora_already_hold() -> None:
    # computed before the options were declared through histmol.options: persisted in corpora
    assert BuildConfig().fingerprint() == "c26020f3510169ed"
    assert BuildConfig(mode="grid", mpp=0.25, min_tissue_fraction=0.2,
                       register="auto").fingerprint() == "ea9ad5f6438b104f"
    assert BuildConfig(patch_px=64, target_mpp=5.0, mpp=4.6).fingerprint() == "4c75950b085e2691"


def schema_bounds(prop: dict[str, Any]) -> dict[str, float]:
    """`ge`/`gt`/`le`/`lt` of a JSON Schema property (possibly `anyOf` [T, null])."""
    branch = next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)
    keys = {"minimum": "ge", "exclusiveMinimum": "gt", "maximum": "le", "exclusiveMaximum": "lt"}
    return {keys[k]: v for k, v in branch.items() if k in keys}


def spec_bounds(spec: OptionSpec) -> dict[str, float]:
    return {k: getattr(spec, k) for k in ("ge", "gt", "le", "lt") if getattr(spec, k) is not None}


@pytest.mark.parametrize(("model", "specs"), [
    ("CorpusOptions", scoped(BUILD_OPTIONS, CORPUS)),
    ("SectionOptions", scoped(BUILD_OPTIONS, SECTION)),
    ("ManifestEntry", scoped(BUILD_OPTIONS, SECTION) + SECTION_FIELDS),
])
def test_manifest_schema_is_the_specs_of_its_scopes(model: str, specs: tuple[OptionSpec, ...]
                                                    ) -> None:
    props = json_schema()["$defs"][model]["properties"]
    assert set(props) == {s.name for s in specs}
    for spec in specs:
        prop = props[spec.name]
        assert prop["description"].startswith(spec.help), spec.name
        assert schema_bounds(prop) == spec_bounds(spec), spec.name
        if spec.choices:
            branch = next(b for b in prop.get("anyOf", [prop]) if "enum" in b)
            assert tuple(branch["enum"]) == spec.choices
        if model == "CorpusOptions":
            assert prop["default"] == spec.default
        elif spec.scope == SECTION:  # unset inherits `defaults:`, then the spec's default
            assert prop["default"] is None and f"[default: {spec.default_label}]" in \
                prop["description"]
    required = json_schema()["$defs"][model].get("required", [])
    assert set(required) == {s.name for s in specs if s.required or s.manifest_required}


def expect_option(param: Any, spec: OptionSpec) -> None:
    """`param` is `spec` on the command line: flag, help, default, required, repeatable."""
    assert param.opts == [spec.cli_flag], spec.name
    assert param.param_type_name == "option"
    assert param.help is not None and param.help.startswith(spec.help), spec.name
    assert param.required == spec.required, spec.name
    if spec.scope == EXTRA:
        assert param.multiple and param.metavar == "KEY=VALUE"
        return
    if not spec.required:
        assert param.default == spec.default, spec.name
    if spec.default_text is not None:
        assert param.show_default == spec.default_text, spec.name
    if spec.choices:
        assert param.metavar == "|".join(spec.choices)
    if spec.bounds_text():
        assert param.help.endswith(f"Allowed: {spec.bounds_text()}."), spec.name


@pytest.mark.parametrize(("command", "specs", "own"), [
    ("build", (*SECTION_FIELDS, *BUILD_OPTIONS, THREADS), {"out", "force"}),
    ("train", TRAIN_OPTIONS, {"corpus", "out", "resume", "split", "fold"}),
    ("eval", (named(TRAIN_OPTIONS, "batch_size"), named(TRAIN_OPTIONS, "num_workers")),
     {"run", "corpus", "split", "genes", "out"}),
    ("embed", (dataclasses.replace(named(TRAIN_OPTIONS, "batch_size"), default=128),),
     {"run", "corpus", "out"}),
    ("demo", (THREADS,), {"out", "seed"}),
    ("ingest", (dataclasses.replace(THREADS, default=1),),
     {"manifest", "out", "dask_address", "max_parallel", "force"}),
])
def test_cli_options_are_the_specs(command: str, specs: tuple[OptionSpec, ...], own: set[str]
                                   ) -> None:
    params = cli_params(command)
    assert set(params) == {s.name for s in specs} | own
    for spec in specs:
        expect_option(params[spec.name], spec)


def test_build_help_shows_each_option_once_with_its_help() -> None:
    result = runner.invoke(app, ["build", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    panel = result.stdout.split("╭─ Options")[1]  # not the docstring's example
    text = re.sub(r"\s+", " ", panel.replace("│", " "))
    for spec in (*SECTION_FIELDS, *BUILD_OPTIONS):
        assert len(re.findall(rf"{spec.cli_flag}\b(?!-)", text)) == 1, spec.cli_flag
        assert spec.help in text, spec.name
    assert "[default: 224]" in text and "[default: (the platform's)]" in text


def manifest_with(tmp_path: Path, block: str, field: str, value: Any) -> Path:
    path = tmp_path / "m.yaml"
    entry = "{section_id: a, platform: st, bundle: b, wsi: w.jpg}"
    if block == "sections":
        entry = entry[:-1] + f", {field}: {value!r}}}"
        path.write_text(f"sections:\n  - {entry}\n")
    else:
        path.write_text(f"{block}: {{{field}: {value!r}}}\nsections:\n  - {entry}\n")
    return path


def out_of_range(spec: OptionSpec) -> list[Any]:
    """Values just outside each declared bound, or an unknown choice."""
    if spec.choices:
        return ["nope"]
    step = 1 if spec.value_type is int else 1e-3
    values = []
    for bound, outside in (("ge", -step), ("gt", 0), ("le", step), ("lt", 0)):
        if getattr(spec, bound) is not None:
            values.append(spec.value_type(getattr(spec, bound) + outside))
    return values


def on_the_bounds(spec: OptionSpec) -> list[Any]:
    """Values on each inclusive bound, or every choice."""
    if spec.choices:
        return list(spec.choices)
    return [spec.value_type(getattr(spec, b)) for b in ("ge", "le") if getattr(spec, b) is not None]


BOUNDED = [s for s in (*BUILD_OPTIONS, named(SECTION_FIELDS, "bin_um"))
           if s.choices or spec_bounds(s)]


@pytest.mark.parametrize("spec", BOUNDED, ids=[s.name for s in BOUNDED])
def test_a_bound_is_enforced_alike_by_config_manifest_and_cli(tmp_path: Path, spec: OptionSpec
                                                               ) -> None:
    block = {CORPUS: "corpus", SECTION: "defaults", ADAPTER: "sections"}[spec.scope]
    cli = ["build", "--platform", "st", "--bundle", str(tmp_path / "missing"), "--wsi",
           str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "c")]
    for value in out_of_range(spec):
        if spec.scope != ADAPTER:
            with pytest.raises(ConfigError, match=rf"^{spec.name} must be"):
                BuildConfig(**{spec.name: value})
        with pytest.raises(ManifestError, match=spec.name):
            load_manifest(manifest_with(tmp_path, block, spec.name, value))
        refused = runner.invoke(app, [*cli, spec.cli_flag, str(value)])
        assert refused.exit_code == 2, (value, refused.output)
        assert f"Invalid value for '{spec.cli_flag}'" in refused.output
    for value in on_the_bounds(spec):
        if spec.scope != ADAPTER:
            assert getattr(BuildConfig(**{spec.name: value}), spec.name) == value
        load_manifest(manifest_with(tmp_path, block, spec.name, value))
        accepted = runner.invoke(app, [*cli, spec.cli_flag, str(value)])
        assert accepted.exit_code == 1 and "missing" in accepted.output, accepted.output


TRAIN_BOUNDED = [s for s in TRAIN_OPTIONS if spec_bounds(s)]


@pytest.mark.parametrize("spec", TRAIN_BOUNDED, ids=[s.name for s in TRAIN_BOUNDED])
def test_a_training_bound_is_enforced_alike_by_config_and_cli(tmp_path: Path, spec: OptionSpec
                                                              ) -> None:
    for value in out_of_range(spec):
        with pytest.raises(ConfigError, match=rf"^{spec.name} must be"):
            TrainConfig(**{spec.name: value})
        refused = runner.invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r"),
                                      spec.cli_flag, str(value)])
        assert refused.exit_code == 2 and f"Invalid value for '{spec.cli_flag}'" in \
            refused.output, refused.output
    for value in on_the_bounds(spec):
        assert getattr(TrainConfig(**{spec.name: value}), spec.name) == value


def test_spec_checks_name_the_field_and_the_range() -> None:
    assert named(BUILD_OPTIONS, "patch_px").problem(8) == "patch_px must be in 16..4096, got 8"
    assert named(BUILD_OPTIONS, "min_match_rate").problem(0.0) == \
        "min_match_rate must be in (0, 1], got 0"
    assert named(BUILD_OPTIONS, "tissue_mpp").problem(0) == "tissue_mpp must be > 0, got 0"
    assert named(BUILD_OPTIONS, "mode").problem("hex") == \
        "mode must be one of 'spot', 'grid', got 'hex'"
    assert named(BUILD_OPTIONS, "patch_px").problem("224") == "patch_px must be a number, got '224'"
    assert named(BUILD_OPTIONS, "mpp").problem(None) is None
    assert named(SECTION_FIELDS, "platform").default is REQUIRED


def test_readme_names_the_options_the_specs_declare() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("Useful `build` options")[1].split("###")[0]
    flags = set(re.findall(r"`(--[a-z-]+)", table)) | set(re.findall(r"above `(--[a-z-]+)`",
                                                                        table))
    declared = {p.opts[0] for p in COMMANDS["build"].params}
    assert flags and flags <= declared, flags - declared
    assert "--max-landmark-residual-um` (50)" in table
    assert named(BUILD_OPTIONS, "max_landmark_residual_um").default == 50
    assert "(default 224 px at 0.5 um/px" in table
    assert (named(BUILD_OPTIONS, "patch_px").default,
            named(BUILD_OPTIONS, "target_mpp").default) == (224, 0.5)
    corpus = re.search(r"corpus: \{.*# (.*)", readme)
    adapter = re.search(r"bin_um: 8 +# platform options: (.*)", readme)
    assert corpus and corpus.group(1).split(", ") == list(CORPUS_LEVEL_FIELDS)
    assert adapter and adapter.group(1).split(", ") == list(PLATFORM_OPTION_FIELDS)
