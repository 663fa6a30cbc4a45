"""The progress bar both long-context runs show (the needle grid and the RULER-style suite): a rich bar weighted by
each cell's prefill work, moving during a cell's prefill, on a terminal only; elsewhere one line per finished cell."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


_P = TypeVar("_P", bound="GridProgress")   # typing.Self is 3.11+; lcrun runs on 3.10


class GridProgress:
    """The bar and its counts; the subclasses turn their run's events into `_start`, `_prefill` and `_cell_done`."""

    def __init__(self, console: Console, *, get_time: Callable[[], float] | None = None) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[cells]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                                 get_time=get_time, transient=True)
        self.task: TaskID | None = None
        self.total = self.done = 0
        self.before = 0.0      # the weight of the cells finished in this run

    def __enter__(self: _P) -> _P:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _start(self, name: str, total: int, done: int, weight: float) -> None:
        self.total, self.done = total, done
        self.task = self.progress.add_task(name, total=max(1.0, weight), cells=self._cells())

    def _describe(self, description: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=description)

    def _prefill(self, weight: float, done: int, total: int) -> None:
        """The running cell (of `weight`) has prefilled `done` of its `total` tokens."""
        if self.task is not None and total:
            self.progress.update(self.task, completed=self.before + weight * done / total)

    def _cell_done(self, weight: float, line: str) -> None:
        self.done += 1
        self.before += weight
        if self.task is not None:
            self.progress.update(self.task, completed=self.before, cells=self._cells())
        if not self.live:
            self.console.print(f"cell {self.done}/{self.total}: {line}", highlight=False, markup=False)

    def _cells(self) -> str:
        return f"{self.done}/{self.total} cells"
