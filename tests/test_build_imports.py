"""The build path stays light: zarr.json without zarr-python, and no heavy package it never uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from zarr.storage import MemoryStore

from histmol.shards.jpeg_codec import JpegCodec
from histmol.shards.shard_writer import DIMENSION_NAMES, part_zarr_json
from histmol.synth import make_slide, write_visium_bundle

# packages a Visium spot build must not import (each costs 0.05-10 s of start-up; fsspec serves
# remote corpora only); matplotlib is used: every build path draws the section's QC figures
NOT_IMPORTED = ("zarr", "scipy.io", "anndata", "spatialdata", "torch", "prefect", "dask",
                "sklearn", "fsspec")


@pytest.mark.parametrize(("n_pairs", "patch_px", "quality", "subsampling"),
                         [(2048, 224, 90, "420"), (1, 16, 1, "444"), (641, 512, 100, "422")])
def test_zarr_json_is_the_document_zarr_python_writes(
    n_pairs: int, patch_px: int, quality: int, subsampling: str
) -> None:
    store: dict = {}
    shape = (n_pairs, patch_px, patch_px, 3)
    array = zarr.create_array(
        MemoryStore(store_dict=store), shape=shape, dtype="uint8",
        chunks=(1, patch_px, patch_px, 3), shards=shape,
        serializer=JpegCodec(quality=quality, subsampling=subsampling), compressors=None,
        filters=None, fill_value=0, chunk_key_encoding={"name": "default", "separator": "/"},
        dimension_names=DIMENSION_NAMES,
    )
    document, key = part_zarr_json(n_pairs, patch_px, quality=quality, subsampling=subsampling)
    assert document == store["zarr.json"].to_bytes()
    assert key == array.metadata.encode_chunk_key((0, 0, 0, 0)) == "c/0/0/0/0"
    assert json.loads(document)["codecs"][0]["configuration"]["codecs"][0]["name"] == "histmol.jpeg"


BUILD = """
import sys
from pathlib import Path
from histmol.build import SectionRequest, build_section
from histmol.config import BuildConfig
bundle, wsi, transform, out = map(Path, sys.argv[1:5])
result = build_section(SectionRequest("visium", bundle, wsi, "s", transform), out,
                       BuildConfig(patch_px=64))
assert result.status == "committed" and result.n_pairs > 0, result
print("imported:", ",".join(sorted(name for name in {names} if name in sys.modules)))
"""


def test_a_visium_build_imports_no_heavy_package_it_does_not_use(tmp_path: Path) -> None:
    slide = make_slide(tmp_path / "slide.tif", width_um=800.0, height_um=700.0, mpp=0.25, seed=2)
    truth = write_visium_bundle(tmp_path / "visium", slide, seed=2, n_genes=20)
    script = BUILD.format(names=repr(NOT_IMPORTED))
    root = str(Path(__file__).resolve().parents[1])  # this checkout's histmol, not an installed one
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, "-c", script, str(truth.bundle), str(slide.path),
         str(truth.transform_path), str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "imported:"


def test_importing_the_build_loads_no_package_only_a_stage_or_a_remote_corpus_uses() -> None:
    # histmol build pays its import before any stage runs (and pays it whole to skip a section
    # already built): scipy.spatial (pitch), skimage (tissue mask), matplotlib (QC figures) and
    # fsspec (remote corpora) are imported where they are used
    late = ("scipy.spatial", "skimage", "matplotlib", "fsspec")
    code = ("import sys, histmol.build; "
            f"print(sorted(m for m in {late!r} if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, env={**os.environ, "PYTHONPATH": root})
    assert done.stdout.strip() == "[]"
