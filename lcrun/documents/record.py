"""What a document is once read: its text exactly as it enters the context, and what was counted and left out on the
way there. Every reader returns one `Document`; the limits every reader honours are one `ReadLimits`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lcrun.errors import DocumentError

KINDS = ("text", "pdf", "html", "docx", "epub", "folder")


def wrap_document(name: str, text: str) -> str:
    """A document as the model sees it: its text inside a tag naming it (the chat's pinned-document message)."""
    return f'<document name="{name}">\n{text.strip()}\n</document>'


@dataclass(frozen=True)
class Document:
    name: str                                  # as the user gave it: a path, a folder, a URL, "-"
    kind: str                                  # one of KINDS: what was read (a URL or stdin says what it held)
    text: str                                  # the text (page markers, file headers included), stripped
    label: str                                 # the name in the <document name=…> tag: the file's name, the URL
    pages: int | None = None                   # PDF pages, EPUB chapters
    files: int | None = None                   # a folder's files read
    skipped: dict[str, int] = field(default_factory=dict)   # what was left out and why: {"binary": 3, …}
    warnings: tuple[str, ...] = ()
    source_bytes: int = 0                      # bytes read from the file, folder or URL

    @property
    def characters(self) -> int:
        return len(self.text)

    @property
    def parts(self) -> str:
        """Its pages, chapters or files in words ("412 pages", "1,203 files"), or "" for a plain text."""
        if self.pages is not None:
            unit = "chapter" if self.kind == "epub" else "page"
            return f"{self.pages:,} {unit}{'' if self.pages == 1 else 's'}"
        return f"{self.files:,} file{'' if self.files == 1 else 's'}" if self.files is not None else ""

    def about(self) -> str:
        """What it is, in a few words: "pdf, 412 pages"."""
        return ", ".join(p for p in (self.kind, self.parts) if p)

    def context_text(self) -> str:
        """Exactly what enters the context for this document."""
        return wrap_document(self.label, self.text)

    def to_dict(self, tokens: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "label": self.label, "pages": self.pages,
                               "files": self.files, "characters": self.characters,
                               "context_characters": len(self.context_text()), "source_bytes": self.source_bytes,
                               "skipped": dict(self.skipped), "warnings": list(self.warnings)}
        if tokens is not None:
            out["tokens"] = tokens
        return out


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what one document may cost, whoever wrote it. Each is far above a real document's and far below
    what would take the machine down: a document beyond them is refused in one line, never half-read."""
    max_chars: int = 64 << 20            # text of one document: ~16M tokens, beyond any context lcrun plans
    max_file_bytes: int = 64 << 20       # a text, HTML or DOCX file (a PDF is read page by page: max_pdf_bytes)
    max_pdf_bytes: int = 2 << 30
    max_url_bytes: int = 256 << 20       # one URL's body (held in memory: a PDF from the web)
    max_pages: int = 10_000              # PDF pages
    max_files: int = 20_000              # files read from one folder
    max_walk_entries: int = 500_000      # directory entries looked at in one folder, ignored ones included
    max_depth: int = 64                  # folder nesting
    max_zip_members: int = 10_000        # DOCX/EPUB parts
    max_unzipped_bytes: int = 512 << 20  # DOCX/EPUB parts, uncompressed
    max_zip_ratio: int = 200             # uncompressed/compressed of one part: a zip bomb's is in the thousands
    seconds: float = 120.0               # wall time for one document (a PDF's pages, a folder, a URL's transfer)
    connect_seconds: float = 10.0        # a URL's connection, and the longest wait for its next bytes
    max_redirects: int = 5


class Deadline:
    """The time one document may take; readers check it between pages, files and chunks."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds
        self.until = time.monotonic() + seconds

    def check(self, doing: str) -> None:
        if time.monotonic() > self.until:
            raise DocumentError(self.name, f"took more than {self.seconds:g} s {doing}; stopped (nothing was added)")

    @property
    def left(self) -> float:
        return max(0.0, self.until - time.monotonic())


def too_long(name: str, limits: ReadLimits) -> DocumentError:
    return DocumentError(name, f"more than {limits.max_chars:,} characters of text (~{limits.max_chars // 4:,} "
                               "tokens, more than any context lcrun plans); give a part of it")
