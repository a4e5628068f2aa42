"""Progress reporting for long work (builds, counted tasks), decoupled from who displays it.

Prefect flow parameters must be JSON-serialisable, so a display callback cannot travel as a
parameter; the CLI installs a reporter here for the duration of a run instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

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


# -- counted tasks (embed, eval, train, validate, export, report, qc) ---------------------------
# A library loop wraps its iterable in `track(...)` (or advances a `task(...)`); whoever runs
# it (the CLI) installs a `TaskReporter` with `tracking`. Without one, both cost a function call.

TaskReporter = Callable[[str, int, "int | None", str], None]
_task_reporters: list[TaskReporter] = []

T = TypeVar("T")


@contextmanager
def tracking(reporter: TaskReporter) -> Iterator[None]:
    """Send task progress `(description, done, total, unit)` to `reporter` while the block runs."""
    with _lock:
        _task_reporters.append(reporter)
    try:
        yield
    finally:
        with _lock:
            _task_reporters.remove(reporter)


def report_task(description: str, done: int, total: int | None, unit: str) -> None:
    """Report `done` of `total` `unit`s of a task (for loops that cannot use `track`)."""
    for reporter in list(_task_reporters):
        reporter(description, done, total, unit)


@contextmanager
def task(
    description: str, *, total: int | None = None, unit: str = "items"
) -> Iterator[Callable[[int], None]]:
    """A counted task: call the yielded `advance(n)` as work completes (n items at a time)."""
    done = 0
    report_task(description, 0, total, unit)

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        report_task(description, done, total, unit)

    yield advance


def track(
    items: Iterable[T],
    description: str,
    *,
    total: int | None = None,
    unit: str = "items",
    weight: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """Yield `items`, reporting one step per item (or `weight(item)` steps, e.g. a batch's pairs).

    `total` defaults to `len(items)` when it has one.
    """
    if total is None and weight is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total=total, unit=unit) as advance:
        for item in items:
            yield item
            advance(1 if weight is None else weight(item))
