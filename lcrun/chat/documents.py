"""Reading a document the user adds to the conversation: text files only, decoded as UTF-8 (or UTF-16 with a BOM)."""
from __future__ import annotations

from pathlib import Path

from lcrun.errors import LcrunError

MAX_DOCUMENT_BYTES = 64 << 20  # ~16M tokens of English: beyond any context this tool can plan


class DocumentError(LcrunError):
    """A file that cannot be added as a document."""


def read_document(path: Path) -> str:
    try:
        if path.is_dir():
            raise DocumentError(str(path), "a folder, not a text file")
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise DocumentError(str(path), f"{size / (1 << 20):.0f} MiB is more text than any context holds")
        data = path.read_bytes()
    except FileNotFoundError:
        raise DocumentError(str(path), "no such file") from None
    except PermissionError:
        raise DocumentError(str(path), "not readable (permission denied)") from None
    except OSError as exc:
        raise DocumentError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise DocumentError(str(path), "starts like UTF-16 text but does not decode as it") from None
    if b"\x00" in data[:8192]:
        raise DocumentError(str(path), "a binary file, not text (convert it to plain text first, e.g. pdftotext)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(str(path), f"not UTF-8 text (invalid byte at offset {exc.start}); "
                                       "convert it first, e.g. iconv -t utf-8") from None
    if not text.strip():
        raise DocumentError(str(path), "empty: nothing to add")
    return text
