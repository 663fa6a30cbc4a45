"""Rich progress bars fed by the core's (done, total) callbacks, one task per phase."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskID, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

_LABELS = {"download": "Downloading", "convert": "Converting", "quantize": "Quantizing (llama.cpp)"}
_COUNTED_IN_TENSORS = {"quantize"}


@contextmanager
def phase_progress(console: Console, *, quiet: bool = False,
                   get_time: Callable[[], float] | None = None) -> Iterator[Callable[[str], Callable[[int, int], None] | None]]:
    """Yields a factory: phase name → callback(done, total). Quiet, or not a terminal: no bars at all."""
    if quiet or not console.is_terminal:
        yield lambda _phase: None
        return
    bytes_columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                     TimeRemainingColumn())
    progress = Progress(*bytes_columns, console=console, transient=False, get_time=get_time)
    tensor_progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("tensors"), TimeRemainingColumn(), console=console, get_time=get_time)

    active: list[Progress] = []  # rich allows one live display at a time: a new phase stops the previous one

    def factory(phase: str) -> Callable[[int, int], None]:
        bars = tensor_progress if phase in _COUNTED_IN_TENSORS else progress
        task: TaskID | None = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                if active and active[-1] is not bars:
                    active[-1].stop()
                if not active or active[-1] is not bars:
                    bars.start()
                    active.append(bars)
                task = bars.add_task(_LABELS.get(phase, phase), total=total or None)
            bars.update(task, completed=done, total=total or None)
        return update

    try:
        yield factory
    finally:
        progress.stop()
        tensor_progress.stop()
