"""Bounds on manifest documents, checked before anything is built from them.

Why: a manifest may come from anyone, and YAML lets a few hundred bytes of nested anchors and
aliases stand for billions of nodes (the "billion laughs"), which then load lazily shared but
explode in everything that walks them (validation, hashing, planning). Every limit is checked on
the parser's event stream (iterative, so a 10^5-deep nesting cannot exhaust the stack) and on the
composed node graph, before any Python object is constructed:

- `MAX_BYTES`: the whole document;
- `MAX_DEPTH`: nesting of mappings and sequences;
- `MAX_STRING`: any scalar (paths, URLs, ids, option values, keys);
- `MAX_NODES`: nodes of the document with every alias expanded (aliases stay allowed: a shared
  option block is fine, a bomb is not).

A refusal is a `LimitError` carrying the 1-based line it concerns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 16 << 20
MAX_DEPTH = 32
MAX_STRING = 4096
MAX_NODES = 1_000_000


class LimitError(ValueError):
    """A document over one of the limits; `line` is 1-based (0: the whole file)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def read_bounded_text(path: Path) -> str:
    """The file's text, refused before reading when it is over `MAX_BYTES`."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise LimitError(0, f"{size} bytes; a manifest holds at most {MAX_BYTES}")
    return path.read_text(encoding="utf-8")


def check_string(value: str, line: int) -> None:
    """Refuse a string longer than `MAX_STRING` characters."""
    if len(value) > MAX_STRING:
        raise LimitError(line, f"a value of {len(value)} characters (at most {MAX_STRING}): "
                               f"{value[:40]!r}...")


def _check_events(text: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise LimitError(line, f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.ScalarEvent):
            check_string(event.value, line)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes under `node` with aliases expanded; memoised, so shared subtrees cost once."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    if size > MAX_NODES:
        raise LimitError(node.start_mark.line + 1,
                         f"aliases expand this to more than {MAX_NODES} nodes "
                         "(a YAML alias bomb?)")
    sizes[id(node)] = size
    return size


def compose_bounded(text: str) -> yaml.Node | None:
    """The document's node graph, every limit checked (LimitError otherwise)."""
    _check_events(text)
    node = yaml.compose(text, Loader=yaml.SafeLoader)  # depth is bounded: recursion is safe
    if node is not None:
        _expanded_size(node, {})
    return node


def construct(node: yaml.Node) -> Any:
    """Python data of a checked node graph (SafeLoader's constructors, no second parse)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()
