"""The two waits before a model runs, shown the same way by `chat`, `serve`, `niah` and `bench`: finding the GGUF (a
download bar when it comes from the Hub) and loading it into llama.cpp (a spinner in a terminal). They are callbacks
the launch calls (lcrun.launch): nothing here loads anything."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console

from .console import is_plain
from .progress import phase_progress


@contextmanager
def download_progress(console: Console) -> Iterator[Callable[[int, int], None] | None]:
    """The callback a Hub download reports its bytes to (a bar on a terminal); the bar ends with the block."""
    with phase_progress(console) as progress:
        yield progress("download")


def loading_status(console: Console) -> Callable[[Path], AbstractContextManager[Any]]:
    """What to show while llama.cpp loads a file: a spinner naming it on a terminal, nothing elsewhere."""
    def loading(path: Path) -> AbstractContextManager[Any]:
        return nullcontext() if is_plain(console) else console.status(f"loading {path.name}…")
    return loading
