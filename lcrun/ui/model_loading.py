"""The two waits before a model runs, shown the same way by `chat`, `niah` and `bench`: finding the GGUF (a download
bar when it comes from the Hub) and loading it into llama.cpp (a spinner in a terminal)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from .progress import phase_progress


def locate_model(console: Console, model: str, hub_file: str | None, revision: str | None) -> Path:
    from lcrun.launch import find_model_file

    with phase_progress(console) as progress:
        return find_model_file(model, hub_file=hub_file, revision=revision, progress=progress("download"))


@contextmanager
def loaded_engine(console: Console, launch: Any) -> Iterator[Any]:
    """The engine for a `Launch` (lcrun.launch), owned by the `with` block: closed however it ends."""
    engine = load_engine(console, launch.config)
    try:
        yield engine
    finally:
        engine.close()


def load_engine(console: Console, config: Any) -> Any:
    """An lcrun.engine.runtime.Engine for `config` (an EngineConfig)."""
    from lcrun.engine.runtime import Engine

    if not console.is_terminal or console.no_color:
        return Engine(config)
    with console.status(f"loading {config.model_path.name}…"):
        return Engine(config)
