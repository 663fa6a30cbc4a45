"""Tokens a document takes in the context: its context text (the <document> tag included) as the model's own
tokenizer splits it — an engine's, or a vocabulary loaded alone (lcrun.engine.vocab) — with no BOS, and control-token
text in a document left as text (a document cannot end a turn)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .record import Document


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, special: bool = ..., add_bos: bool = ...) -> list[int]: ...


def document_tokens(documents: Sequence[Document], tokenizer: Tokenizer) -> list[int]:
    return [len(tokenizer.tokenize(document.context_text(), special=False, add_bos=False)) for document in documents]
