"""Typed errors of the converter. Each names the file it is about and the problem, in one line."""
from __future__ import annotations

import os


class ConvertError(Exception):
    """Base class: `str(err)` is the one line a user sees: "<path>: <problem>"."""

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CheckpointError(ConvertError):
    """The Hugging Face checkpoint is missing a file, or a file is malformed."""


class UnsupportedModelError(ConvertError):
    """The checkpoint is well-formed but describes something we do not convert (architecture, RoPE kind, dtype)."""


class TokenizerError(ConvertError):
    """The tokenizer files are missing, malformed or of a kind we cannot express in GGUF."""


class OutputError(ConvertError):
    """The output cannot be written: exists already, directory not writable, disk full."""


class Cancelled(ConvertError):
    """The conversion was interrupted; nothing was left at the output path."""
