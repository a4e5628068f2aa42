"""Manifest loading: YAML and CSV, paths, option layering, and errors that name file and line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from conftest import REPO_ROOT, fixture_path
from typer.testing import CliRunner

import histmol.demo
from histmol.build import SectionRequest
from histmol.cli import app
from histmol.config import CORPUS_LEVEL_FIELDS, BuildConfig
from histmol.errors import ConfigError
from histmol.manifest import (
    ManifestError,
    RemoteInputRequest,
    SectionOptions,
    json_schema,
    load_manifest,
    with_local_inputs,
)
from histmol.remote_inputs import CACHE_ENV
from histmol.shards.atomic import is_temp_name

MANIFESTS = REPO_ROOT / "manifests"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_demo_manifest_describes_exactly_the_demo_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # generate_demo_inputs with the generators stubbed: the requests it returns, without pixels
    monkeypatch.setattr(histmol.demo, "make_slide", lambda path, **_: type("S", (), {"path": path}))
    monkeypatch.setattr(histmol.demo, "write_visium_bundle", lambda *a, **k: None)
    monkeypatch.setattr(histmol.demo, "write_st_bundle", lambda *a, **k: None)
    expected = histmol.demo.generate_demo_inputs(tmp_path / "demo", seed=0)
    (tmp_path / "manifests").mkdir()
    shutil.copy(MANIFESTS / "demo.yaml", tmp_path / "manifests" / "demo.yaml")
    plan = load_manifest(tmp_path / "manifests" / "demo.yaml")
    assert plan.requests == expected
    assert plan.configs == [BuildConfig()] * 3
    assert plan.lines == [10, 18, 26]


def test_fixtures_manifest_builds_mob1_at_its_own_geometry(tmp_path: Path) -> None:
    fixture_path("legacy_st_stutility_MOB1/counts/MOB1.jpg")
    plan = load_manifest(MANIFESTS / "fixtures.yaml")
    assert plan.configs == [BuildConfig(mpp=4.6, target_mpp=5.0, patch_px=64)]
    result = CliRunner().invoke(app, ["ingest", str(MANIFESTS / "fixtures.yaml"),
                                      "--out", str(tmp_path / "corpus")])
    assert result.exit_code == 0, result.output
    row = pd.read_parquet(tmp_path / "corpus" / "sections.parquet").iloc[0]
    got = (row["section_id"], row["n_pairs"], row["n_units"], row["licence"])
    assert got == ("mob1", 379, 379, "MIT")


def test_layering_paths_and_platform_options(tmp_path: Path) -> None:
    path = write(tmp_path / "m.yaml", """
corpus: {patch_px: 128, target_mpp: 1.0}
defaults: {min_tissue_fraction: 0.3, mode: grid}
sections:
  - section_id: hd-1
    platform: Visium-HD
    bundle: data/hd/outs
    wsi: /abs/slide.svs
    landmarks: data/hd/pairs.csv
    bin_um: 16
    units: bins
    alignment: data/hd/align.csv
    mode: spot
    options: {positions: p.parquet}
    donor_id: d7
""")
    plan = load_manifest(path)
    [request], [config] = plan.requests, plan.configs
    assert request == SectionRequest(
        "visium-hd", tmp_path / "data/hd/outs", Path("/abs/slide.svs"), "hd-1", None,
        {"patient_id": "d7"},
        {"bin_um": 16.0, "units": "bins", "alignment": str(tmp_path / "data/hd/align.csv"),
         "positions": "p.parquet"},
        tmp_path / "data/hd/pairs.csv",
    )
    assert config == BuildConfig(patch_px=128, target_mpp=1.0, min_tissue_fraction=0.3, mode="spot")
    assert plan.corpus_fields == {"patch_px": 128, "target_mpp": 1.0, "resample": "lanczos",
                                  "jpeg_quality": 90}


def test_csv_manifest_equals_its_yaml_twin(tmp_path: Path) -> None:
    write(tmp_path / "m.csv",
          "section_id,platform,bundle,wsi,mpp,patch_px,option.positions,tissue\n"
          "a,st,st/a,st/a/he.jpg,4.6,64,sel.tsv,\n"
          "b,visium,v/outs,v.svs,,64,,colon\n")
    write(tmp_path / "m.yaml", """
corpus: {patch_px: 64}
sections:
  - {section_id: a, platform: st, bundle: st/a, wsi: st/a/he.jpg, mpp: 4.6,
     options: {positions: sel.tsv}}
  - {section_id: b, platform: visium, bundle: v/outs, wsi: v.svs, tissue: colon}
""")
    from_csv, from_yaml = load_manifest(tmp_path / "m.csv"), load_manifest(tmp_path / "m.yaml")
    assert from_csv.requests == from_yaml.requests and from_csv.configs == from_yaml.configs
    assert from_csv.lines == [2, 3]


@pytest.mark.parametrize(("text", "message"), [
    ("sections:\n  - section_id: ok\n    platform: st\n    bundle: b\n    wsi: w\n"
     "  - section_id: Bad Id\n    platform: st\n    bundle: b\n    wsi: w\n",
     "m.yaml:6: sections[1] (Bad Id): section_id: section id 'Bad Id' is not a safe slug"),
    ("sections:\n  - section_id: a\n    platform: st\n    wsi: w\n",
     "m.yaml:2: sections[0] (a): bundle: Field required"),
    ("sections:\n  - section_id: a\n    platform: st\n    bundle: b\n    wsi: w\n    tisue: x\n",
     "m.yaml:2: sections[0] (a): tisue: Extra inputs are not permitted"),
    ("sections:\n  - {section_id: a, platform: st, bundle: b, wsi: w}\n"
     "  - {section_id: a, platform: st, bundle: c, wsi: w}\n",
     "m.yaml:3: sections[1]: section_id 'a' repeats sections[0] (line 2)"),
    ("sections:\n  - {section_id: a, platform: st, bundle: 'nosuch://bkt/b', wsi: w}\n",
     "m.yaml:2: sections[0] (a): bundle: 'nosuch://bkt/b': unknown or unavailable URL protocol "
     "'nosuch'"),
    ("corpus: {patch_px: 8}\nsections:\n  - {section_id: a, platform: st, bundle: b, wsi: w}\n",
     "m.yaml: manifest: corpus.patch_px: Input should be greater than or equal to 16"),
    ("sections:\n  - {section_id: a, platform: st, bundle: b, wsi: w, mpp: -1}\n",
     "m.yaml:2: sections[0] (a): mpp: Input should be greater than or equal to 0.05"),
    ("sections: []\n", "m.yaml: manifest: sections: List should have at least 1 item"),
    ("sections:\n  - {section_id: a, platform: st\n", "m.yaml:3: not valid YAML"),
    ("sections:\n  - {section_id: a, platform: st, bundle: b, wsi: w, options: {alignment: x},"
     " alignment: y}\n",
     "m.yaml:2: sections[0] (a): ['alignment'] given both as a field and in options"),
])
def test_yaml_errors_name_the_line_and_entry(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path / "m.yaml", text))
    assert str(info.value).startswith(f"{tmp_path}/{message}"), str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    ("section_id,platform,bundle,wsi,patch_px\na,st,b,w,64\nb,st,b,w,32\n",
     "m.csv:3: patch_px=32 differs from 64 on an earlier row"),
    ("section_id,platform,bundle,wsi\na,st,b,w\nb,nanostring,b,w\n",
     "m.csv:3: sections[1] (b): platform: unknown platform 'nanostring'"),
    ("section_id,platform,bundle,wsi\na,st,b,w,extra\n", "m.csv:2: more cells than header columns"),
    ("section_id,platform,bundle,wsi\n", "m.csv: no sections"),
])
def test_csv_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path / "m.csv", text))
    assert str(info.value).startswith(f"{tmp_path}/{message}"), str(info.value)


def test_section_options_cover_every_per_section_build_option() -> None:
    per_section = {f.name for f in dataclasses.fields(BuildConfig)} - set(CORPUS_LEVEL_FIELDS)
    assert {f.alias or k for k, f in SectionOptions.model_fields.items()} == per_section


def test_checked_in_json_schema_is_current() -> None:
    stored = json.loads((MANIFESTS / "schema.json").read_text())
    assert stored == json_schema()
    entry = stored["$defs"]["ManifestEntry"]
    assert set(entry["required"]) == {"section_id", "platform", "bundle", "wsi"}


def url_plan(tmp_path: Path) -> tuple[str, RemoteInputRequest]:
    """Inputs in fsspec's in-memory file system; the plan of a manifest naming them by URL."""
    root = f"memory://{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    for name, data in {"hd/outs/a.h5": b"a" * 5, "hd/outs/spatial/b.json": b"{}",
                       "slide.tif": b"tiff", "align.json": b"[1]"}.items():
        fs.pipe(f"{root}/{name}", data)
    write(tmp_path / "local.csv", "1,0,0\n0,1,0\n0,0,1\n")  # a local input beside them
    write(tmp_path / "m.yaml", f"""
sections:
  - {{section_id: hd-1, platform: visium-hd, bundle: "{root}/hd/outs", wsi: "{root}/slide.tif",
     alignment: "{root}/align.json", transform: local.csv}}
""")
    [request] = load_manifest(tmp_path / "m.yaml").requests
    assert isinstance(request, RemoteInputRequest)
    return root, request


def inputs(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "inputs").iterdir())


def test_url_inputs_are_listed_at_plan_time_and_fetched_where_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histmol.build import section_key as cache_key

    flow, worker = tmp_path / "flow-cache", tmp_path / "worker-cache"
    monkeypatch.setenv(CACHE_ENV, str(flow))
    root, request = url_plan(tmp_path)
    assert not flow.exists()  # planning lists, never downloads
    assert sorted(request.sources) == ["alignment", "bundle", "wsi"]
    assert request.bundle == flow / "inputs" / request.sources["bundle"].key / "outs"
    assert request.wsi.name == "slide.tif" and request.transform == tmp_path / "local.csv"
    key = cache_key(request, BuildConfig())
    # a worker with its own cache: fetches what a stage reads, into that cache only
    monkeypatch.setenv(CACHE_ENV, str(worker))
    slide_only = with_local_inputs(request, "wsi")
    assert slide_only.wsi == worker / "inputs" / request.sources["wsi"].key / "slide.tif"
    assert slide_only.wsi.read_bytes() == b"tiff" and inputs(worker) == [
        request.sources["wsi"].key]
    local = with_local_inputs(request)
    assert {p.relative_to(local.bundle).as_posix(): p.read_bytes()
            for p in local.bundle.rglob("*") if p.is_file()} == {
        "a.h5": b"aaaaa", "spatial/b.json": b"{}"}
    assert Path(local.options["alignment"]).read_bytes() == b"[1]"
    assert len(inputs(worker)) == 3 and not flow.exists()
    # the key and fingerprint come from the listings: the same with or without the copies
    assert local.fingerprint() == request.fingerprint()
    assert cache_key(local, BuildConfig()) == key
    # errors name the input by URL, not by this process' copy
    assert local.name_urls(f"{local.bundle}/a.h5: broken") == f"{root}/hd/outs/a.h5: broken"
    # a fetched input is never listed or fetched again in this process' cache
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
    assert with_local_inputs(request) == local


def test_an_input_changed_since_the_plan_is_refused_and_changes_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histmol.build import section_key as cache_key

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    root, request = url_plan(tmp_path)
    fsspec.filesystem("memory").pipe(f"{root}/hd/outs/a.h5", b"a" * 6)
    with pytest.raises(ConfigError, match=f"{root}/hd/outs: changed since the ingest was planned"):
        with_local_inputs(request, "bundle")
    assert not (tmp_path / "cache" / "inputs").exists()
    _, replanned = url_plan(tmp_path)
    assert replanned.fingerprint() != request.fingerprint()
    assert cache_key(replanned, BuildConfig()) != cache_key(request, BuildConfig())


def test_concurrent_fetches_of_one_input_copy_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    _, request = url_plan(tmp_path)
    memory = type(fsspec.filesystem("memory"))
    real_get, calls = memory.get_file, []

    def counting_get(self: object, path: str, local: str, **kwargs: object) -> None:
        calls.append(path)
        real_get(self, path, local, **kwargs)

    monkeypatch.setattr(memory, "get_file", counting_get)
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(with_local_inputs(request).bundle))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [found[0]] * 6
    assert sorted(calls) == sorted(f"/{tmp_path.name}/{name}" for name in (
        "hd/outs/a.h5", "hd/outs/spatial/b.json", "slide.tif", "align.json"))
    assert len(inputs(cache)) == 3 and not any(is_temp_name(n) for n in inputs(cache))


def test_a_fetch_that_loses_the_rename_to_another_process_returns_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    _, request = url_plan(tmp_path)
    source = request.sources["wsi"]
    memory = type(fsspec.filesystem("memory"))
    real_get = memory.get_file

    def racing_get(self: object, path: str, local: str, **kwargs: object) -> None:
        real_get(self, path, local, **kwargs)
        other = source.local_path()  # another process (own lock) renames its copy first
        other.parent.mkdir(parents=True)
        other.write_bytes(b"tiff")

    monkeypatch.setattr(memory, "get_file", racing_get)
    assert source.fetch() == source.local_path()
    assert source.local_path().read_bytes() == b"tiff"
    assert inputs(tmp_path / "cache") == [source.key]  # the loser's temporary folder is gone


def test_mixed_case_ids_are_kept_for_the_build_and_clash_case_insensitively(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "sections:\n  - {section_id: B4, platform: st, bundle: b, wsi: w}\n")
    [request] = load_manifest(tmp_path / "m.yaml").requests
    assert request.resolved_section_id() == "b4" and request.section_name() == "B4"
    (tmp_path / "m.yaml").write_text(
        "sections:\n  - {section_id: B4, platform: st, bundle: b, wsi: w}\n"
        "  - {section_id: b4, platform: st, bundle: c, wsi: w}\n")
    with pytest.raises(ManifestError, match="section_id 'b4' repeats sections\\[0\\]"):
        load_manifest(tmp_path / "m.yaml")
