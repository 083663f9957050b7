"""Progress while a scenario runs: a live bar on a terminal, a line every few seconds otherwise
(under CI or with output sent to a file)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

LINE_EVERY = 3.0


class Tracker:
    def __init__(self, console: Console, label: str, total: int, bar: RichProgress | None) -> None:
        self._console = console
        self._label = label
        self._total = total
        self._bar = bar
        self._task = bar.add_task(label, total=total) if bar else None
        self._started = time.monotonic()
        self._last_line = 0.0
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, description=f"{self._label} {note}")
            return
        now = time.monotonic()
        if now - self._last_line >= LINE_EVERY:
            self._last_line = now
            self._line(note)

    def _line(self, note: str) -> None:
        elapsed = time.monotonic() - self._started
        self._console.print(
            f"  {self._label}: {self.done}/{self._total} {note} ({elapsed:.0f} s)",
            highlight=False,
            markup=False,
        )

    def finish(self, note: str = "") -> None:
        if self._bar is None:
            self._line(note or "done")


class Progress:
    def __init__(self, console: Console) -> None:
        self.console = console

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    @contextmanager
    def track(self, label: str, total: int) -> Iterator[Tracker]:
        if not self.console.is_terminal:
            tracker = Tracker(self.console, label, total, None)
            yield tracker
            tracker.finish()
            return
        columns = (
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            yield Tracker(self.console, label, total, bar)
