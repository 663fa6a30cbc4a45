"""Documents in the conversation: the pinned message a document (read by lcrun.documents) becomes, and the records
of measuring, adding, listing and dropping one."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lcrun.documents import Document
from lcrun.errors import DocumentError

from .conversation import Message


class DocumentTooLong(DocumentError):
    """A document the session's context cannot hold, even with every droppable turn gone."""

    def __init__(self, subject: str, problem: str, *, prompt_tokens: int, reserve: int) -> None:
        super().__init__(subject, problem)
        self.prompt_tokens = prompt_tokens   # the prompt with it (no reply header)
        self.reserve = reserve               # what a context that holds it keeps for a reply


def document_message(document: Document) -> Message:
    """A document as the conversation pins it: a user message holding its context text."""
    return Message("user", document.context_text(), document.label, about=document.about())


def already_held(messages: Sequence[Message], document: Document) -> bool:
    """Whether a restored conversation pins this document already, the same text under the same name."""
    pinned = document_message(document)
    return any(m.pinned and m.document == pinned.document and m.content == pinned.content for m in messages)


@dataclass(frozen=True)
class DocumentCheck:
    document: Document
    tokens: int            # what it adds to the prompt
    used_after: int        # prompt tokens once it is in (after any drops)
    drops_turns: int       # oldest turns that must go to make room

    @property
    def name(self) -> str:
        return self.document.label


@dataclass(frozen=True)
class DocumentEntry:
    number: int            # as /docs lists it and /drop takes it, from 1
    name: str
    about: str | None
    tokens: int            # what it adds to the prompt now


@dataclass(frozen=True)
class DocumentPrefilled:
    """A document added (or dropped), and the cache brought up to the conversation with it (or without it)."""
    name: str
    tokens: int            # what it adds to the prompt (or took from it)
    evaluated: int         # prompt tokens evaluated: from where it goes (or went) to the end of the conversation
    seconds: float
    dropped: bool = False
