"""Console view of `histmol ingest`: a live progress display and the closing summary table.

The flow reports section outcomes through `flows.ingest.ingest_events` and, for sections built
in this process, written pairs through `histmol.progress`; this module only renders them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table


class IngestProgress:
    """Overall sections bar (done, failed, skipped, units/s) plus one pair bar per section."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.overall: TaskID = bar.add_task("sections", total=None, stats="")
        self.sections: dict[str, TaskID] = {}
        self.counts = {"committed": 0, "skipped": 0, "failed": 0}
        self.units = 0
        self.started = time.perf_counter()

    def on_event(self, event: str, payload: dict[str, Any]) -> None:
        """Handle an ingest event from the flow (see `flows.ingest.ingest_events`)."""
        if event == "start":
            self.bar.update(self.overall, total=payload["total"])
            return
        status = payload["status"]
        self.counts[status] += 1
        if status == "committed":
            self.units += payload["n_units"]
        task = self.sections.pop(payload["section_id"], None)
        if task is not None:
            self.bar.remove_task(task)
        rate = self.units / max(time.perf_counter() - self.started, 1e-9)
        stats = (f"{self.counts['committed']} committed, {self.counts['skipped']} skipped, "
                 f"{self.counts['failed']} failed, {rate:,.0f} units/s")
        self.bar.update(self.overall, advance=1, stats=stats)

    def on_pairs(self, section_id: str, done: int, total: int) -> None:
        """Pairs written so far in a section built in this process."""
        if section_id not in self.sections:
            self.sections[section_id] = self.bar.add_task(f"  {section_id}", total=total,
                                                          stats="pairs")
        self.bar.update(self.sections[section_id], completed=done, total=total)


@contextmanager
def ingest_display(console: Console) -> Iterator[IngestProgress]:
    """Show live progress on `console` while the block runs."""
    from flows.ingest import ingest_events
    from histmol.progress import reporting

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        view = IngestProgress(bar)
        with ingest_events(view.on_event), reporting(view.on_pairs):
            yield view


def outcome_table(outcomes: list[dict[str, Any]], title: str) -> Table:
    """One row per manifest entry: status, pairs, units, seconds and the failure reason."""
    table = Table(title=title)
    for header in ("section", "platform", "status", "pairs", "units", "s", "reason"):
        table.add_column(header, overflow="fold",
                         justify="right" if header in ("pairs", "units", "s") else "left")
    colour = {"committed": "green", "skipped": "cyan", "failed": "red"}
    for o in outcomes:
        table.add_row(o["section_id"], o["platform"], f"[{colour[o['status']]}]{o['status']}",
                      f"{o['n_pairs']:,}", f"{o['n_units']:,}", f"{o['seconds']:.1f}",
                      escape(str(o["reason"])))  # reasons quote rules like [a-z0-9]: not markup
    return table
