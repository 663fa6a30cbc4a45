"""One entry point for every kind of document: what the user names (a file, a folder, an http(s) URL, `-` for
standard input) is read by the reader its content calls for — by its first bytes, then its name — never by trust in
an extension alone. Heavy libraries are imported by the reader that needs them, when a document of its kind comes."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from lcrun.errors import DocumentError

from .record import Document, ReadLimits, too_long
from .text import decode_text
from .url import fetch, is_url

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_SNIFF = 1024
_MEDIA_KINDS = {"application/pdf": "pdf", "text/html": "html", "application/xhtml+xml": "html",
                "application/epub+zip": "epub",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx"}


def _zip_kind(name: str, names: list[str], mimetype: bytes) -> str:
    if "word/document.xml" in names:
        return "docx"
    if mimetype.strip() == b"application/epub+zip" or "META-INF/container.xml" in names:
        return "epub"
    if "ppt/presentation.xml" in names or "xl/workbook.xml" in names:
        raise DocumentError(name, "a PowerPoint or Excel file: lcrun reads Word (.docx) documents; export it as PDF "
                                  "or text")
    raise DocumentError(name, "a zip archive, not a document; unpack it and give the folder")


def sniff(head: bytes, name: str) -> str:
    """The kind a file's first bytes (and then its name) say it is: pdf, zip, html or text."""
    if b"%PDF-" in head[:_SNIFF]:
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if name.lower().endswith(HTML_SUFFIXES):
        return "html"
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "text"


def _from_bytes(name: str, label: str, data: bytes, kind: str, limits: ReadLimits,
                charset: str | None = None) -> Document:
    if kind == "zip":
        import io
        import zipfile

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = archive.namelist()
                mimetype = archive.read("mimetype")[:64] if "mimetype" in names else b""
        except (zipfile.BadZipFile, OSError) as exc:
            raise DocumentError(name, f"damaged: not a readable zip container ({exc})") from None
        kind = _zip_kind(name, names, mimetype)
    if kind == "pdf":
        from .pdf import read_pdf

        return read_pdf(name, label, limits, data=data)
    if kind == "docx":
        from .docx import read_docx

        return read_docx(name, label, data, limits)
    if kind == "epub":
        from .epub import read_epub

        return read_epub(name, label, data, limits)
    if kind == "html":
        from .html import read_html

        return read_html(name, label, data, limits)
    if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8", "us-ascii", "ascii"):
        try:
            text = data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            raise DocumentError(name, f"does not decode as the {charset} its server declares") from None
    else:
        text = decode_text(data, name)
    if not text.strip():
        raise DocumentError(name, "empty: nothing to add")
    if len(text) > limits.max_chars:
        raise too_long(name, limits)
    return Document(name=name, kind="text", text=text.strip(), label=label, source_bytes=len(data))


def _read_capped(stream: BinaryIO, cap: int, name: str) -> bytes:
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise DocumentError(name, f"more than the {cap >> 20} MiB lcrun reads from one document")
    return data


def _read_path(text: str, limits: ReadLimits, include: Sequence[str], exclude: Sequence[str]) -> Document:
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            from .folder import read_folder

            label = path.resolve().name or str(path)
            return read_folder(text, label, path, limits, include=include, exclude=exclude)
        if not path.exists():
            raise DocumentError(text, "no such file or folder")
        if not path.is_file():
            raise DocumentError(text, "not a regular file or folder")
        with path.open("rb") as f:
            head = f.read(_SNIFF)
        kind = sniff(head, path.name)
        if kind == "pdf":
            from .pdf import read_pdf

            return read_pdf(text, path.name, limits, path=path)
        size = path.stat().st_size
        if size > limits.max_file_bytes:  # said from the size, before a byte of it is read
            raise DocumentError(text, f"{size / (1 << 20):,.0f} MiB, more than the {limits.max_file_bytes >> 20} MiB "
                                      f"lcrun reads from one {'HTML' if kind == 'html' else kind} file")
        with path.open("rb") as f:
            data = _read_capped(f, limits.max_file_bytes, text)
    except PermissionError:
        raise DocumentError(text, "not readable (permission denied)") from None
    except OSError as exc:
        raise DocumentError(text, f"cannot be read ({exc.strerror or exc})") from None
    return _from_bytes(text, path.name, data, kind, limits)


def read_document(source: str, limits: ReadLimits | None = None, *, include: Sequence[str] = (),
                  exclude: Sequence[str] = (), stdin: BinaryIO | None = None) -> Document:
    """The document `source` names: a file (text, Markdown, source, PDF, HTML, DOCX, EPUB), a folder, an http(s)
    URL, or `-` (standard input, or `stdin`). A DocumentError (one line, naming it) for anything that cannot be read
    whole within `limits`."""
    limits = limits or ReadLimits()
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = _read_capped(stream, limits.max_file_bytes, "stdin")
        return _from_bytes("-", "stdin", data, sniff(data[:_SNIFF], ""), limits)
    if is_url(source):
        got = fetch(source, limits)
        kind = _MEDIA_KINDS.get(got.content_type) or sniff(got.data[:_SNIFF], got.url.partition("?")[0])
        if kind == "text" and got.content_type and not got.content_type.startswith("text/") \
                and got.content_type not in ("application/json", "application/xml", "application/x-yaml"):
            raise DocumentError(source, f"the server sent {got.content_type}, not a document lcrun reads")
        return _from_bytes(source, source, got.data, kind, limits, got.charset)
    return _read_path(source, limits, include, exclude)


def read_documents(sources: Sequence[str], limits: ReadLimits | None = None, *, include: Sequence[str] = (),
                   exclude: Sequence[str] = (), stdin: BinaryIO | None = None) -> list[Document]:
    """Every source in order; the first that cannot be read stops it (nothing half-read is returned)."""
    return [read_document(s, limits, include=include, exclude=exclude, stdin=stdin) for s in sources]
