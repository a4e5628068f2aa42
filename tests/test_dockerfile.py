"""The Dockerfile is a plain mirror of README.md's set-up, pinned by constraints.txt.

No Docker engine runs here, so what is checked is the agreement: the same pip install (with the
same constraints), every package the wheel needs copied in, the `/data` volume the README mounts,
and a constraints file that pins every runtime dependency within pyproject.toml's ranges.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
README = (REPO / "README.md").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    found = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def pip_install_args(command: str) -> list[str]:
    """The arguments of one `pip install`, minus flags that do not change what is installed."""
    args = shlex.split(command)[2:]
    return [a for a in args if a not in ("--no-cache-dir", "-e")]


def test_constraints_pin_every_runtime_dependency_within_its_range() -> None:
    pinned = pins()
    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (line, pinned[name])
    assert pinned["torch"] == "2.13.0"
    dev = {
        canonicalize_name(Requirement(r).name)
        for r in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
    assert not {"pytest", "ruff", "moto"} & set(pinned) & dev  # runtime closure only


def test_dockerfile_installs_as_the_readme_does() -> None:
    setup = re.search(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert setup is not None
    readme_install = next(p for p in setup[1].split("&&") if "pip install" in p)
    readme_args = pip_install_args(readme_install.strip().removeprefix(".venv/bin/"))
    run = re.search(r"^RUN (.*?)(?=^\S)", DOCKERFILE, flags=re.M | re.S)
    assert run is not None
    installs = [c.strip() for c in run[1].replace("\\\n", " ").split("&&")]
    torch_first, histmol = installs
    assert "download.pytorch.org/whl/cpu" in torch_first and "torch==2.13.0" in torch_first
    assert pip_install_args(histmol) == readme_args == ["-c", "constraints.txt", "."]


def test_dockerfile_copies_what_the_install_needs() -> None:
    copied = " ".join(re.findall(r"^COPY (.*)$", DOCKERFILE, flags=re.M)).split()
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "manifests"):
        assert needed in copied
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied


def test_the_readme_docker_commands_use_the_documented_volume() -> None:
    assert re.search(r"^VOLUME /data$", DOCKERFILE, flags=re.M)
    assert re.search(r"^WORKDIR /data$", DOCKERFILE, flags=re.M)
    assert 'CMD ["demo", "--out", "/data/demo"]' in DOCKERFILE
    block = re.search(r"```bash\n(docker build .*?)```", README, flags=re.S)
    assert block is not None
    runs = [line for line in block[1].splitlines() if line.startswith("docker run")]
    assert runs and all('-v "$PWD/out:/data" histmol' in line for line in runs)
