"""Fail fast: cheap checks answer before any server or heavy import, and name the problem."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_path

from histmol.errors import BundleError, FileProblem, WSIError
from histmol.manifest import ManifestError, load_manifest
from histmol.preflight import check_build_inputs, check_output_folder, check_output_path
from histmol.synth import make_slide, write_st_bundle, write_visium_bundle
from histmol.synth.xenium import write_xenium_bundle
from platform_adapters import xenium
from platform_adapters.detect import SIGNATURES, detect_platform, score_bundle

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("prefect", "torch", "dask", "zarr", "spatialdata", "histmol.build", "openslide")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small synthetic bundles of three platforms on one slide."""
    root = tmp_path_factory.mktemp("bundles")
    slide = make_slide(root / "slide.tif", width_um=800.0, height_um=700.0, mpp=0.5, seed=3)
    write_visium_bundle(root / "visium", slide, n_genes=20)
    write_st_bundle(root / "st", slide, n_genes=20)
    write_xenium_bundle(root / "xenium", slide, n_genes=20)
    return {
        "visium": root / "visium" / "outs",
        "st": root / "st",
        "xenium": root / "xenium",
        "slide": slide.path,
    }


def run_cli(
    *args: str, cwd: Path = REPO
) -> tuple[subprocess.CompletedProcess[str], float, list[str]]:
    """Run histmol in a fresh interpreter; return the result, seconds and heavy modules loaded."""
    code = (
        "import sys, json\n"
        "from histmol.cli import app\n"
        "try:\n"
        f"    app({list(args)!r}, prog_name='histmol')\n"
        "except SystemExit as stop:\n"
        f"    heavy = sorted(m for m in sys.modules\n"
        f"                   if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r})\n"
        "    print(json.dumps(heavy)); sys.exit(stop.code)\n"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    seconds = time.perf_counter() - start
    heavy = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else []
    return done, seconds, heavy


def test_detects_each_synthetic_bundle(bundles: dict[str, Path]) -> None:
    for platform in ("visium", "st", "xenium"):
        assert detect_platform(bundles[platform]) == platform
    # Visium's outs/ or the folder holding it
    assert detect_platform(bundles["visium"].parent) == "visium"


@pytest.mark.parametrize(
    ("relative", "platform"),
    [
        ("xenium_mousebrain_subset", "xenium"),
        ("visium_seurat", "visium"),
        ("visium_spatialexperiment/section1", "visium"),
        ("visiumhd_visiumio_mousebrain", "visium-hd"),
        ("legacy_st_stutility_MOB1", "st"),
        ("stereoseq_spateo", "stereo-seq"),
        ("slideseq_spacexr_cerebellum/SpatialRNA/Vignette", "slide-seq"),
        ("cosmx_giotto_lung12/Raw", "cosmx"),
        ("cosmx_lung_p9s1_subset/NanostringCosMx_HumanLung_P9S1_Small", "cosmx"),
        ("merscope_ovarian_p2s2_subset/VizgenMERSCOPE", "merscope"),
        ("merscope_giotto_mousebrain/Raw", "merscope"),
    ],
)
def test_detects_real_fixtures(relative: str, platform: str) -> None:
    assert detect_platform(fixture_path(relative)) == platform


def test_every_platform_has_a_signature() -> None:
    from platform_adapters import platform_names

    assert set(SIGNATURES) == set(platform_names())


def test_unrecognisable_and_ambiguous_bundles_say_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no platform's files found here"):
        detect_platform(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a_exprMat_file.csv").write_text("x")  # CosMx, weight 10
    (mixed / "cell_by_gene.csv").write_text("x")  # MERSCOPE, weight 10
    assert score_bundle(mixed).candidates() == ["cosmx", "merscope"]
    with pytest.raises(BundleError, match=r"several platforms found \(cosmx, merscope\)"):
        detect_platform(mixed)


def test_another_platforms_bundle_is_named(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="this looks like a Visium bundle, not Xenium"):
        check_build_inputs("xenium", bundles["visium"], bundles["slide"], tmp_path / "c")
    with pytest.raises(
        BundleError, match=r"legacy Spatial Transcriptomics \(st\) bundle, not Visium"
    ):
        check_build_inputs("visium", bundles["st"], bundles["slide"], tmp_path / "c")
    assert (
        check_build_inputs("auto", bundles["xenium"], bundles["slide"], tmp_path / "c") == "xenium"
    )
    assert (
        check_build_inputs("VISIUM", bundles["visium"], bundles["slide"], tmp_path / "c")
        == "visium"
    )


def test_paths_of_the_wrong_kind(bundles: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c"
    with pytest.raises(BundleError, match="bundle not found"):
        check_build_inputs("visium", tmp_path / "typo", bundles["slide"], out)
    with pytest.raises(WSIError, match="must be a file, but this is a folder"):
        check_build_inputs("visium", bundles["visium"], tmp_path, out)
    with pytest.raises(WSIError, match="WSI \\(--wsi\\) not found"):
        check_build_inputs("visium", bundles["visium"], tmp_path / "slide.svs", out)
    with pytest.raises(FileProblem, match="--transform not found"):
        check_build_inputs(
            "visium",
            bundles["visium"],
            bundles["slide"],
            out,
            files=[(tmp_path / "m.csv", "--transform")],
        )
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileProblem, match="--out is an existing file"):
        check_output_folder(afile)
    with pytest.raises(FileProblem, match="is a file, so --out"):
        check_output_folder(afile / "corpus")
    with pytest.raises(FileProblem, match="already exists; give --force"):
        check_output_path(afile)
    check_output_path(afile, overwrite=True)
    check_output_folder("s3://bucket/corpus")  # a URL is the writer's business


def test_build_typo_answers_fast_without_heavy_imports(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    done, seconds, heavy = run_cli(
        "build",
        "--platform",
        "visium",
        "--bundle",
        str(tmp_path / "outz"),
        "--wsi",
        str(bundles["slide"]),
        "--out",
        str(tmp_path / "corpus"),
    )
    assert done.returncode == 1
    assert f"{tmp_path / 'outz'}: bundle not found" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert heavy == []  # answered before Prefect, zarr, torch or the slide readers were imported
    assert seconds < 15  # ~1 s on an idle 2-core machine; loose for a busy one


def test_out_an_existing_file_is_one_line(bundles: dict[str, Path], tmp_path: Path) -> None:
    afile = tmp_path / "corpus.txt"
    afile.write_text("x")
    done, _, heavy = run_cli(
        "build",
        "--platform",
        "auto",
        "--bundle",
        str(bundles["visium"]),
        "--wsi",
        str(bundles["slide"]),
        "--out",
        str(afile),
    )
    assert done.returncode == 1 and heavy == []
    assert "--out is an existing file" in done.stderr and "Traceback" not in done.stderr
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\nsections: []\n")
    done, _, heavy = run_cli("ingest", str(manifest), "--out", str(afile))
    assert done.returncode == 1 and heavy == []
    assert "--out is an existing file" in done.stderr
    done, _, heavy = run_cli("demo", "--out", str(afile))
    assert done.returncode == 1 and heavy == []
    assert "--out is an existing file" in done.stderr


def test_manifest_platform_auto(bundles: dict[str, Path], tmp_path: Path) -> None:
    manifest, slide = tmp_path / "m.yaml", bundles["slide"]
    manifest.write_text(
        "version: 1\nsections:\n"
        f"  - {{section_id: a, platform: auto, bundle: {bundles['visium']}, wsi: {slide}}}\n"
        f"  - {{section_id: b, platform: Auto, bundle: {bundles['st']}, wsi: {slide}}}\n"
    )
    plan = load_manifest(manifest)
    assert [r.platform for r in plan.requests] == ["visium", "st"]
    (tmp_path / "empty").mkdir()
    manifest.write_text(
        "version: 1\nsections:\n"
        f"  - {{section_id: a, platform: auto, bundle: empty, wsi: {bundles['slide']}}}\n"
    )
    with pytest.raises(
        ManifestError,
        match=r"m.yaml:3: sections\[0\] \(a\): platform auto: .*"
        "no platform's files found",
    ):
        load_manifest(manifest)


def test_xenium_missing_alignment_suggests_cli_flags(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "xenium"
    folder.mkdir()
    for path in bundles["xenium"].iterdir():
        if "alignment" not in path.name and "keypoints" not in path.name:
            (folder / path.name).symlink_to(path)
    with pytest.raises(BundleError) as caught:
        xenium.read(folder, wsi=bundles["slide"])
    message = str(caught.value)
    assert "--transform FILE" in message and "--alignment FILE" in message
    assert "native_to_wsi=" not in message
    assert xenium.read(folder, wsi=bundles["slide"], native_to_wsi=np.eye(3)).n_units > 0
