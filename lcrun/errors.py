"""Typed errors of the application. The CLI prints `str(err)` as one line and exits non-zero."""
from __future__ import annotations

import os


class LcrunError(Exception):
    """Base class: `str(err)` is "<path or subject>: <problem>"."""

    def __init__(self, subject: str | os.PathLike[str] | None, problem: str) -> None:
        self.subject = os.fspath(subject) if subject is not None else None
        self.problem = problem
        super().__init__(f"{self.subject}: {problem}" if self.subject else problem)


class GGUFFileError(LcrunError):
    """A GGUF file is missing, truncated or corrupt."""


class HubError(LcrunError):
    """The Hugging Face Hub (or the HF_ENDPOINT standing in for it) refused or could not be reached."""


class EngineError(LcrunError):
    """llama.cpp failed to load or run a model."""
