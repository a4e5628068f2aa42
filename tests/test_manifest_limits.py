"""Hostile manifests fail fast, naming file and line: alias bombs, deep nesting, huge values."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from histmol import manifest_limits
from histmol.manifest import ManifestError, load_manifest

ENTRY = """\
sections:
  - section_id: crc-01
    platform: visium
    bundle: b/outs
    wsi: s.tif
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bomb(levels: int = 9) -> str:
    """Billion laughs inside an entry's options: 10 ** levels strings from ~1 kB."""
    lines = ['      a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"      a{i}: &a{i} [{refs}]")
    return ENTRY + "    options:\n      blocks:\n" + "\n".join(
        "  " + line for line in lines) + "\n"


def test_alias_bomb_fails_fast_in_bounded_memory(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.yaml", bomb())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ManifestError, match=rf"{path}:\d+: aliases expand this to more than"):
            load_manifest(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert peak < 20 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_a_shared_option_block_through_an_alias_is_fine(tmp_path: Path) -> None:
    text = """\
version: 1
sections:
  - section_id: crc-01
    platform: visium
    bundle: b/outs
    wsi: s.tif
    options: &shared {positions: spots.tsv}
  - section_id: crc-02
    platform: visium
    bundle: b/outs
    wsi: s.tif
    options: *shared
"""
    plan = load_manifest(write(tmp_path / "m.yaml", text))
    assert [r.options for r in plan.requests] == [{"positions": "spots.tsv"}] * 2


def test_deep_nesting_is_refused_at_its_line(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    path = write(tmp_path / "deep.yaml", ENTRY + f"    options: {{x: {deep}}}\n")
    with pytest.raises(ManifestError, match=rf"{path}:6: nested deeper than 32 levels"):
        load_manifest(path)


def test_long_strings_are_refused_at_their_line(tmp_path: Path) -> None:
    path = write(tmp_path / "long.yaml", ENTRY + f"    tissue: {'x' * 5000}\n")
    with pytest.raises(ManifestError, match=rf"{path}:6: a value of 5000 characters"):
        load_manifest(path)
    csv = write(tmp_path / "long.csv", "section_id,platform,bundle,wsi\n"
                                       f"crc-01,visium,b,s.tif\ncrc-02,visium,{'b' * 5000},s.tif\n")
    with pytest.raises(ManifestError, match=rf"{csv}:3: a value of 5000 characters"):
        load_manifest(csv)


def test_oversized_documents_are_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manifest_limits, "MAX_BYTES", 64)
    path = write(tmp_path / "big.yaml", ENTRY)
    with pytest.raises(ManifestError, match=rf"{path}: {len(ENTRY)} bytes; a manifest holds at"):
        load_manifest(path)


def test_version_defaults_to_1_and_others_are_refused(tmp_path: Path) -> None:
    assert len(load_manifest(write(tmp_path / "a.yaml", ENTRY)).requests) == 1
    path = write(tmp_path / "b.yaml", "version: 2\n" + ENTRY)
    with pytest.raises(ManifestError, match=rf"{path}: manifest: version: Input should be 1"):
        load_manifest(path)
