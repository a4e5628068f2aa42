"""Write constraints.txt: the exact versions of histmol's runtime dependencies in this environment.

Why: the Dockerfile (and anyone who wants the tested set) installs with `-c constraints.txt`, so
an image built next year gets the versions the tests passed with. Only the runtime dependency
closure of histmol is listed (no dev tools, nothing else that happens to be installed); local
version labels (torch's `+cpu`) are dropped, the CPU wheel index supplies them.

Run from the repository root, in the environment the tests passed in:
    python tools/freeze_constraints.py > constraints.txt
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(root: str) -> dict[str, str]:
    """Canonical name -> installed version of every runtime dependency of `root`, recursively."""
    pinned: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # a marker-excluded or optional dependency that is not installed
        if name != root:
            pinned[canonicalize_name(name)] = dist.version.split("+")[0]
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if req.marker and not any(req.marker.evaluate(env) for env in environments):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return pinned


def main() -> None:
    """Print the constraints file."""
    print("# histmol's runtime dependencies, as tested: python tools/freeze_constraints.py")
    for name, version in sorted(closure("histmol").items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    sys.exit(main())
