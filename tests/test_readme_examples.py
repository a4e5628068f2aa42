"""Every bash and python example in README.md runs as written on what its first command makes.

The README's first block ends in `histmol demo --out demo/`; that command runs once per session
in a fresh folder (holding a copy of `manifests/`, as a clone does), then every later block runs
there in document order: bash blocks with `bash -e`, python blocks in a fresh interpreter. A block
that needs what a test machine has not (a user's bucket, a cluster, several GPUs) is marked in the
README by `<!-- readme-test: skip (why) -->` on the line before it and is reported as skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(
    r"(?:<!-- readme-test: skip \((?P<why>.*?)\) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```",
    re.S,
)
MAX_SKIPPED = 11  # skips must stay few: each one is an example nobody checks


@dataclass(frozen=True)
class Block:
    """One fenced example: its language, code, skip reason and the heading it sits under."""

    index: int
    lang: str
    code: str
    skip: str | None
    heading: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{self.index:02d}-{slug}-{self.lang}"


def headings(text: str) -> list[tuple[int, str]]:
    """(offset, title) of every Markdown heading outside fenced code."""
    found, offset, fenced = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.append((offset, line.lstrip("#").strip()))
        offset += len(line)
    return found


def readme_blocks() -> list[Block]:
    text = README.read_text()
    titles = headings(text)
    blocks = []
    for index, match in enumerate(BLOCK.finditer(text)):
        above = [title for offset, title in titles if offset < match.start()]
        blocks.append(Block(index, match["lang"], match["code"], match["why"], above[-1]))
    return blocks


BLOCKS = readme_blocks()


def environment(home: Path) -> dict[str, str]:
    """The installed `histmol` first on PATH, this checkout importable, Prefect state kept here."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    (home / "prefect-home").mkdir(exist_ok=True)
    env["PREFECT_HOME"] = str(home / "prefect-home")
    env["HISTMOL_CACHE_DIR"] = str(home / "cache")
    # a busy 2-core test machine starts the in-process Prefect server slowly
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    return env


def run(block_code: str, lang: str, cwd: Path, env: dict[str, str]) -> None:
    args = (
        ["bash", "-e", "-c", block_code] if lang == "bash" else [sys.executable, "-c", block_code]
    )
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (
        f"{block_code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


def first_command() -> str:
    """The README's first command with its virtual-environment prefix: the demo build."""
    first = BLOCKS[0]
    assert first.lang == "bash" and first.skip is None
    command = first.code.strip().split("&&")[-1].strip()
    assert command == ".venv/bin/histmol demo --out demo/"
    return command.removeprefix(".venv/bin/")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder like a fresh clone's root after the README's first command."""
    folder = tmp_path_factory.mktemp("readme-clone")
    shutil.copytree(REPO / "manifests", folder / "manifests")
    env = environment(tmp_path_factory.mktemp("readme-state"))
    run(first_command(), "bash", folder, env)
    assert (folder / "demo" / "corpus" / "manifest.parquet").is_file()
    return folder, env


def test_readme_blocks_are_found_and_skips_are_few() -> None:
    assert len(BLOCKS) >= 15
    skipped = [b for b in BLOCKS if b.skip]
    assert len(skipped) <= MAX_SKIPPED, [b.id for b in skipped]
    assert all(b.skip.strip() for b in skipped)
    # every fenced bash/python block is either matched here or not an example at all
    fences = re.findall(r"```(bash|python)\n", README.read_text())
    assert len(fences) == len(BLOCKS)


# Not marked slow: about 4 minutes on a quiet 2-core machine, and CI must catch a drifting README.
@pytest.mark.parametrize("block", BLOCKS[1:], ids=[b.id for b in BLOCKS[1:]])
def test_readme_block_runs(block: Block, workdir: tuple[Path, dict[str, str]]) -> None:
    if block.skip:
        pytest.skip(f"README marks it: {block.skip}")
    folder, env = workdir
    run(block.code, block.lang, folder, env)
