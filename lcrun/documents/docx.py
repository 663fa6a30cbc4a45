"""Word documents (.docx) by python-docx (MIT): paragraphs and tables in document order, as Markdown — headings as
`#`, list paragraphs as `-`, tables as pipe rows. Its XML parser resolves no entities (no billion laughs); the zip
container is checked first (archive.py)."""
from __future__ import annotations

import io
from typing import Any

from lcrun.errors import DocumentError

from .archive import open_zip
from .record import Document, ReadLimits, TextParts


def _paragraph(paragraph: Any) -> str:
    text = paragraph.text.strip()
    if not text:
        return ""
    style = (paragraph.style.name if paragraph.style is not None else "") or ""
    if style == "Title":
        return f"# {text}"
    if style.startswith("Heading"):
        level = style.removeprefix("Heading").strip()
        return f"{'#' * min(int(level) if level.isdigit() else 1, 6)} {text}"
    if style.startswith("List"):
        return f"- {text}"
    return text


def _table(table: Any) -> str:
    rows = []
    for i, row in enumerate(table.rows):
        cells = [" ".join(cell.text.split()).replace("|", "\\|") for cell in row.cells]
        rows.append("| " + " | ".join(cells) + " |")
        if i == 0:
            rows.append("|" + "---|" * len(cells))
    return "\n".join(rows)


def read_docx(name: str, label: str, data: bytes, limits: ReadLimits) -> Document:
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table

    open_zip(name, limits, data=data).close()
    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError) as exc:
        raise DocumentError(name, f"damaged: not a readable Word document ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - lxml and zipfile errors of a malformed part, said in one line
        raise DocumentError(name, f"damaged: {type(exc).__name__}: {exc}") from None
    blocks = TextParts(name, limits)
    for block in document.iter_inner_content():
        text = _table(block) if isinstance(block, Table) else _paragraph(block)
        if text:
            blocks.add(text)
    if not blocks:
        raise DocumentError(name, "a Word document with no text")
    return Document(name=name, kind="docx", text=blocks.joined(), label=label, source_bytes=len(data))
