"""Progress reporting for long builds, decoupled from who displays it.

Prefect flow parameters must be JSON-serialisable, so a display callback cannot travel as a
parameter; the CLI installs a reporter here for the duration of a run instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Reporter = Callable[[str, int, int], None]
_lock = threading.Lock()
_reporters: list[Reporter] = []


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send `report` calls to `reporter` while the block runs."""
    with _lock:
        _reporters.append(reporter)
    try:
        yield
    finally:
        with _lock:
            _reporters.remove(reporter)


def report(section_id: str, done: int, total: int) -> None:
    """Tell every installed reporter that `done` of `total` pairs of a section are written."""
    for reporter in list(_reporters):
        reporter(section_id, done, total)
