"""Documents as people have them — text and source, PDF, HTML, Word, EPUB, folders and git checkouts, URLs, standard
input — read into the text that enters a model's context, with bounded memory and time. `read_document` is the one
entry point; each format has its own module, imported when a document of its kind is read."""
from __future__ import annotations

from lcrun.errors import DocumentError

from .record import Document, ReadLimits, wrap_document
from .reader import read_document, read_documents

__all__ = ["Document", "DocumentError", "ReadLimits", "read_document", "read_documents", "wrap_document"]
