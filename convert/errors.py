"""Typed errors of the converter. Each names the file it is about and the problem, in one line."""
from __future__ import annotations

import os


class OneLineError(Exception):
    """Base of every lcrun error: `str(err)` is the one line a user sees, "<path or subject>: <problem>".
    The application's errors (lcrun.errors) derive from it too, so the CLI catches one type."""

    def __init__(self, subject: str | os.PathLike[str] | None, problem: str) -> None:
        self.subject = os.fspath(subject) if subject is not None else None
        self.problem = problem
        super().__init__(f"{self.subject}: {problem}" if self.subject else problem)


class ConvertError(OneLineError):
    """Base class of the converter's errors; their subject is always a file or folder."""

    @property
    def path(self) -> str | None:
        return self.subject


class CheckpointError(ConvertError):
    """The Hugging Face checkpoint is missing a file, or a file is malformed."""


class UnsupportedModelError(ConvertError):
    """The checkpoint is well-formed but describes something we do not convert (architecture, RoPE kind, dtype)."""


class TokenizerError(ConvertError):
    """The tokenizer files are missing, malformed or of a kind we cannot express in GGUF."""


class OutputError(ConvertError):
    """The output cannot be written: exists already, directory not writable, disk full."""
