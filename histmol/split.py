"""Train/test splits of a corpus' sections, written once and shared by `train` and `eval`.

A split assigns every section to one group (its patient, section, tissue or platform, or an
explicit list of held-out sections per fold) and every group to one fold; fold ``i`` holds out
its groups' sections and trains on all the others, so no held-out pair is ever trained on.
``folds=None`` is leave-one-group-out. With ``k`` folds, groups are dealt largest first (pairs)
to the fold with fewest pairs so far; the seed orders groups of equal size. The split file is
JSON (``format: histmol-split``); its ``sha256`` (over the canonical content) is what trained
runs record, so `eval` refuses an encoder trained on another split or fold.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histmol.errors import ConfigError

FORMAT = "histmol-split"
VERSION = 1
SPLIT_BY = ("patient", "section", "tissue", "platform", "list")
_COLUMN = {"patient": "patient_id", "section": "section_id", "tissue": "tissue",
           "platform": "platform"}


@dataclass(frozen=True)
class Split:
    """Sections (id -> group) and, per fold, the groups it holds out."""

    by: str
    seed: int
    groups: dict[str, str]
    folds: tuple[tuple[str, ...], ...]

    @property
    def sections(self) -> list[str]:
        """Every section of the split, sorted."""
        return sorted(self.groups)

    def test_sections(self, fold: int) -> list[str]:
        """The sections fold `fold` holds out (sorted)."""
        held = set(self.folds[self._index(fold)])
        return sorted(s for s, g in self.groups.items() if g in held)

    def train_sections(self, fold: int) -> list[str]:
        """The sections fold `fold` trains on: every other section of the split (sorted)."""
        held = set(self.folds[self._index(fold)])
        return sorted(s for s, g in self.groups.items() if g not in held)

    def _index(self, fold: int) -> int:
        if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or \
                not 0 <= fold < len(self.folds):
            raise ConfigError(f"fold must be 0..{len(self.folds) - 1}, got {fold!r}")
        return int(fold)

    def to_dict(self) -> dict[str, Any]:
        """The file's content without its checksum (canonical: sorted sections)."""
        return {"format": FORMAT, "version": VERSION, "by": self.by, "seed": self.seed,
                "sections": {s: self.groups[s] for s in sorted(self.groups)},
                "folds": [{"fold": i, "test_groups": list(groups),
                           "test_sections": self.test_sections(i)}
                          for i, groups in enumerate(self.folds)]}

    @property
    def sha256(self) -> str:
        """Checksum of the canonical content: what a trained fold records."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def check_covers(self, section_ids: Sequence[str], where: str) -> None:
        """ConfigError naming sections of `where` that the split does not place."""
        missing = sorted(set(section_ids) - set(self.groups))
        if missing:
            raise ConfigError(f"{where}: sections {missing[:5]} are not in the split "
                              f"({len(missing)} in all); write the split again")

    def record(self, fold: int) -> dict[str, Any]:
        """What a run trained on fold `fold` stores: checksum, fold and both parts."""
        return {"sha256": self.sha256, "fold": self._index(fold), "by": self.by,
                "train_sections": self.train_sections(fold),
                "test_sections": self.test_sections(fold)}


def make_split(sections: Sequence[Mapping[str, Any]], by: str, *, folds: int | None = None,
               seed: int = 0, held_out: Sequence[Sequence[str]] | None = None) -> Split:
    """Split `sections` (rows with section_id, n_pairs and the `by` column) into folds.

    `by="list"` takes the folds from `held_out` (one list of section ids per fold; sections in
    none of them are always trained on); otherwise `folds` groups per fold (None: one fold per
    group).
    """
    if by not in SPLIT_BY:
        raise ConfigError(f"split by must be one of {SPLIT_BY}, got {by!r}")
    ids = [str(row["section_id"]) for row in sections]
    if len(set(ids)) != len(ids):
        raise ConfigError("split: a section id appears twice (corpora share a section id)")
    if by == "list":
        return _explicit(ids, held_out or [], seed)
    if held_out:
        raise ConfigError("held-out section lists need by='list'")
    column = _COLUMN[by]
    groups: dict[str, str] = {}
    for row in sections:
        value = row.get(column)
        if value is None or (isinstance(value, float) and value != value) or str(value) == "":
            raise ConfigError(f"split by {by}: section {row['section_id']!r} has no {column} "
                              "(build it with that metadata, or split by another column)")
        groups[str(row["section_id"])] = str(value)
    names = sorted(set(groups.values()))
    k = len(names) if folds is None else folds
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= len(names):
        raise ConfigError(f"split by {by}: folds must be 2..{len(names)} (the number of "
                          f"{by} groups: {names[:10]}), got {folds!r}")
    if folds is None:  # leave one group out, folds in group order
        return Split(by, seed, groups, tuple((g,) for g in names))
    size = {g: 0 for g in names}
    for row in sections:
        size[groups[str(row["section_id"])]] += int(row.get("n_pairs") or 0)
    rank = {g: int(r) for g, r in zip(names, np.random.default_rng(seed).permutation(len(names)),
                                      strict=True)}
    load = [0] * k
    members: list[list[str]] = [[] for _ in range(k)]
    for group in sorted(names, key=lambda g: (-size[g], rank[g])):
        target = min(range(k), key=lambda i: (load[i], len(members[i]), i))
        members[target].append(group)
        load[target] += size[group]
    return Split(by, seed, groups, tuple(tuple(sorted(m)) for m in members))


def _explicit(ids: list[str], held_out: Sequence[Sequence[str]], seed: int) -> Split:
    if len(held_out) < 1:
        raise ConfigError("split by list: give the held-out sections of at least one fold")
    groups = {s: "train" for s in ids}
    for i, listed in enumerate(held_out):
        for section in listed:
            if section not in groups:
                raise ConfigError(f"split by list: section {section!r} (fold {i}) is not in "
                                  f"the corpus")
            if groups[section] != "train":
                raise ConfigError(f"split by list: section {section!r} is held out twice")
            groups[section] = f"fold-{i}"
        if not listed:
            raise ConfigError(f"split by list: fold {i} holds out no section")
    if all(g != "train" for g in groups.values()) and len(held_out) == 1:
        raise ConfigError("split by list: the only fold holds out every section")
    return Split("list", seed, groups, tuple((f"fold-{i}",) for i in range(len(held_out))))


def write_split(split: Split, path: str | os.PathLike[str]) -> Path:
    """Write the split file atomically (temp + rename); the checksum goes with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**split.to_dict(), "sha256": split.sha256}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_split(path: str | os.PathLike[str]) -> Split:
    """Read a split file; ConfigError naming it when it is not one or was edited by hand."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no split file (write one with `histmol split`)") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable split file ({error})") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(f"{path}: not a {FORMAT} version {VERSION} file")
    try:
        split = Split(str(data["by"]), int(data["seed"]),
                      {str(k): str(v) for k, v in data["sections"].items()},
                      tuple(tuple(str(g) for g in f["test_groups"]) for f in data["folds"]))
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ConfigError(f"{path}: malformed split file ({error!r})") from error
    if split.sha256 != data.get("sha256"):
        raise ConfigError(f"{path}: checksum mismatch (edited by hand?): write it again with "
                          "`histmol split`")
    return split
