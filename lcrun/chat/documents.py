"""Compatibility until the chat reads documents through lcrun.documents itself (issue 17, phase 2): a document the
user adds, as its text, read by the readers of lcrun.documents (text, PDF, HTML, DOCX, EPUB, folders, URLs)."""
from __future__ import annotations

from pathlib import Path

from lcrun.errors import DocumentError

__all__ = ["DocumentError", "read_document"]


def read_document(path: Path) -> str:
    from lcrun.documents import read_document as read

    return read(str(path)).text
