"""Fingerprints of build inputs: an unchanged section is skipped and a changed one rebuilt."""

from __future__ import annotations

import hashlib
from pathlib import Path


def input_fingerprint(*paths: Path | None) -> str:
    """Hash of every input file's name, size and modification time (files found recursively).

    Stat-only on purpose: hashing a 5 GB WSI on every re-run would cost more than the check saves.
    Paths are hashed relative to each root so a moved corpus source still matches.
    """
    digest = hashlib.sha256()
    for root in paths:
        if root is None:
            continue
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        digest.update(root.name.encode() + b"\0")
        for file in files:
            stat = file.stat()
            relative = file.relative_to(root).as_posix() if root.is_dir() else file.name
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]
