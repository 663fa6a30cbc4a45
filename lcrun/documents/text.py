"""Plain text, Markdown and source code: UTF-8 (a BOM is dropped) or UTF-16 with a BOM, as the file has it."""
from __future__ import annotations

from lcrun.errors import DocumentError

BINARY_SNIFF = 8192  # a NUL in the first 8 KiB means binary, as git and grep decide it


def looks_binary(data: bytes) -> bool:
    return not data.startswith((b"\xff\xfe", b"\xfe\xff")) and b"\x00" in data[:BINARY_SNIFF]


def decode_text(data: bytes, name: str) -> str:
    """The text of `data`, or a one-line DocumentError naming `name` and what is wrong."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise DocumentError(name, "starts like UTF-16 text but does not decode as it") from None
    if looks_binary(data):
        raise DocumentError(name, "a binary file, not text, PDF, HTML, DOCX or EPUB (convert it to one of them)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(name, f"not UTF-8 text (invalid byte at offset {exc.start}); "
                                  "convert it first, e.g. iconv -t utf-8") from None
