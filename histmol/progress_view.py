"""Rich progress bars for the counted tasks of `histmol.progress` (the CLI's side of it).

Each task description gets one bar with its count, rate and time left; tasks without a known
total show a count and a rate. `summary_line` is the one line a command ends with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from histmol.progress import tracking

__all__ = ["summary_line", "task_display"]


class CountColumn(ProgressColumn):
    """`done/total unit` (or `done unit` without a total)."""

    def render(self, task: Task) -> Text:
        """Draw the column."""
        unit = task.fields.get("unit", "")
        done = f"{int(task.completed):,}"
        if task.total is None:
            return Text(f"{done} {unit}")
        return Text(f"{done}/{int(task.total):,} {unit}")


class RateColumn(ProgressColumn):
    """Items per second, in the task's unit."""

    def render(self, task: Task) -> Text:
        """Draw the column."""
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("")
        unit = task.fields.get("unit", "")
        return Text(f"{speed:,.1f} {unit}/s" if speed < 100 else f"{speed:,.0f} {unit}/s")


@contextmanager
def task_display(console: Console) -> Iterator[None]:
    """Show a bar per counted task reported through `histmol.progress.track` / `task`."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        CountColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def on_report(description: str, done: int, total: int | None, unit: str) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total, unit=unit)
            bar.update(tasks[description], completed=done, total=total)

        with tracking(on_report):
            yield


def summary_line(verb: str, target: object, started: float, detail: str = "") -> str:
    """`<verb> <target> (<detail>, N s)`: how a command says where its output went."""
    seconds = time.perf_counter() - started
    inside = f"{detail}, {seconds:.1f} s" if detail else f"{seconds:.1f} s"
    return f"{verb} {target} ({inside})"
