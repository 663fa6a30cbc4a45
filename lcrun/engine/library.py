"""llama.cpp once per process: its log captured (kept quiet, error lines remembered for the next `EngineError`), the
version check against the llama-cpp-python release the engine mirrors, and `llama_backend_init`."""
from __future__ import annotations

import ctypes
import os
import re
import sys
from collections import deque
from typing import Any

from lcrun import LLAMA_CPP_PYTHON_VERSION

_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5  # enum ggml_log_level


class LlamaLog:
    """llama.cpp's log, kept quiet: error lines are remembered for the next EngineError's message, nothing is
    printed (LCRUN_DEBUG=1 prints all of it to stderr)."""

    def __init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=6)
        self._level = 0
        self._callback: Any = None

    def install(self, lc: Any) -> None:
        # set on every load: llama-cpp-python installs its own callback when its modules load (and others may)
        if self._callback is None:
            @lc.llama_log_callback
            def on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
                if level != _GGML_LOG_CONT:
                    self._level = level
                message = text.decode("utf-8", errors="replace") if text else ""
                if self._level == _GGML_LOG_ERROR:
                    self.errors.append(message)
                if os.environ.get("LCRUN_DEBUG") == "1":
                    sys.stderr.write(message)

            self._callback = on_log
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))

    def detail(self, fallback: str) -> str:
        """The error lines logged since the last call, as one line ("func: " prefixes dropped)."""
        lines = [re.sub(r"^(\w+: )+", "", line.strip()) for line in "".join(self.errors).splitlines()]
        self.errors.clear()
        return "; ".join(line for line in lines if line) or fallback


log = LlamaLog()
started: set[str] = set()  # "backend" once llama_backend_init ran, "version" once the version was checked


def quiet_llama_log(lc: Any) -> None:
    """Give llama.cpp's log back to lcrun's quiet callback (after a caller captured it for a while)."""
    log.install(lc)


def start_llama(lc: Any) -> None:
    """The quiet log, the version warning (once), llama_backend_init (once)."""
    log.install(lc)
    if "version" not in started:
        started.add("version")
        installed = getattr(lc, "__version__", "unknown")
        if installed != LLAMA_CPP_PYTHON_VERSION:
            print(f"warning: lcrun's engine mirrors llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} but {installed} is "
                  "installed; its C structs or defaults may differ", file=sys.stderr, flush=True)
    if "backend" not in started:
        lc.llama_backend_init()
        started.add("backend")
