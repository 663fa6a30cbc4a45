"""A loaded model: the engine for a decided launch, owned by a `with` block (closed however it ends), with what was
decided on the way — the plan, the chat format, the headers read, the warnings.

Engines are made by one factory: llama.cpp's (lcrun.engine.runtime.Engine) unless `set_engine_factory` put another
in its place — the one point where tests inject fake engines (tests/fixtures/engines.py)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lcrun.engine.protocol import EngineConfig

from .decide import Launch, decide_launch
from .options import LaunchOptions

if TYPE_CHECKING:
    from lcrun.chat.formats import FormatChoice
    from lcrun.gguf_split import GGUFSet
    from lcrun.planner import Choice

EngineFactory = Callable[[EngineConfig], Any]
_engine_factory: EngineFactory | None = None


def set_engine_factory(factory: EngineFactory | None) -> EngineFactory | None:
    """Make engines with `factory` from now on (None: llama.cpp's again); returns the factory it replaces."""
    global _engine_factory
    previous, _engine_factory = _engine_factory, factory
    return previous


def _make_engine(config: EngineConfig) -> Any:
    if _engine_factory is not None:
        return _engine_factory(config)
    from lcrun.engine.runtime import Engine  # llama_cpp: imported only when a model really loads

    return Engine(config)


class LoadedModel:
    """The engine of a launch and what was decided for it; a context manager that closes the engine."""

    def __init__(self, launch: Launch, engine: Any) -> None:
        self.launch = launch
        self.engine = engine

    @property
    def model_path(self) -> Path:
        return self.launch.model_path

    @property
    def choice(self) -> Choice:
        return self.launch.choice

    @property
    def chat_format(self) -> FormatChoice | None:
        return self.launch.chat_format

    @property
    def gguf(self) -> GGUFSet:
        return self.launch.gguf

    @property
    def warnings(self) -> list[str]:
        return self.launch.warnings

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def open_model(options: LaunchOptions | Launch, *,
               loading: Callable[[Path], AbstractContextManager[Any]] | None = None,
               download: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Load the model `options` ask for — or a launch already decided from them (the commands that show the plan
    first pass that). `loading(path)` wraps the load (a spinner); `download(done, total)` gets a Hub download's
    bytes."""
    launch = options if isinstance(options, Launch) else decide_launch(options, download=download)
    with (loading or _quietly)(launch.model_path):
        engine = _make_engine(launch.config)
    return LoadedModel(launch, engine)


def _quietly(_path: Path) -> AbstractContextManager[Any]:
    return nullcontext()
