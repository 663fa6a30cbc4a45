"""Typed errors of the application. The CLI prints `str(err)` as one line and exits non-zero."""
from __future__ import annotations

from lcrun.convert.errors import OneLineError


class LcrunError(OneLineError):
    """Base class: `str(err)` is "<path or subject>: <problem>"."""


class GGUFFileError(LcrunError):
    """A GGUF file is missing, truncated or corrupt."""


class HubError(LcrunError):
    """The Hugging Face Hub (or the HF_ENDPOINT standing in for it) refused or could not be reached."""


class HubUnreachable(HubError):
    """The Hub could not be reached at all (offline mode, connection failure, server down)."""


class EngineError(LcrunError):
    """llama.cpp failed to load or run a model."""


class GrammarError(LcrunError):
    """A grammar (GBNF, or one made from a JSON schema) that llama.cpp cannot compile, or cannot follow any further."""


class DocumentError(LcrunError):
    """A document (file, folder, URL, standard input) that cannot be read into the context."""
