"""PDF through PDFium (pypdfium2: Apache-2.0/BSD-3, the engine Chrome uses): each page's text layer in PDFium's
reading order, behind a `[page N]` marker, with the hyphens TeX and others put at line ends joined back.

PDFium was measured against pypdf on a pdfTeX manual of 324 pages (docs/performance.md): the same words found
(99.7 % of pdftotext's), 1.6x pdftotext's speed where pypdf is 0.15x. The file is opened by PDFium itself (it reads
the pages it is asked for, not the whole file into memory); pages are read one at a time and closed."""
from __future__ import annotations

import re
from pathlib import Path

from lcrun.errors import DocumentError

from .record import Deadline, Document, ReadLimits, TextParts

_TAIL = 2048  # "%%EOF" must be within the last bytes: a file cut short (an interrupted download) lacks it
# PDFium marks a hyphen it found at a line's end as \x02 (FPDFText's "generated hyphen"), before the line break
_LINE_END_HYPHEN = re.compile(r"\x02(?:\r?\n)?")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# PDFium's error codes (fpdfview.h FPDF_ERR_*)
_ERR_PASSWORD, _ERR_SECURITY = 4, 5


def page_text(raw: str) -> str:
    """PDFium's text of one page as lcrun gives it: line-end hyphens joined, \\r\\n as \\n, control codes out."""
    text = _LINE_END_HYPHEN.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


def _check_complete(name: str, tail: bytes) -> None:
    if b"%%EOF" not in tail:
        raise DocumentError(name, "damaged: the PDF ends early (no %%EOF at its end; a truncated download?)")


def read_pdf(name: str, label: str, limits: ReadLimits, *, path: Path | None = None,
             data: bytes | None = None) -> Document:
    """The PDF at `path`, or in `data` (a URL's body, standard input)."""
    import pypdfium2 as pdfium

    if path is not None:
        size = path.stat().st_size
        if size > limits.max_pdf_bytes:
            raise DocumentError(name, f"{size / (1 << 30):.1f} GiB, more than the {limits.max_pdf_bytes >> 30} GiB "
                                      "of PDF lcrun reads")
        with path.open("rb") as f:
            f.seek(max(0, size - _TAIL))
            _check_complete(name, f.read())
        source: object = str(path)
    else:
        assert data is not None
        size = len(data)
        _check_complete(name, data[-_TAIL:])
        source = data
    deadline = Deadline(name, limits.seconds)
    try:
        doc = pdfium.PdfDocument(source)
    except pdfium.PdfiumError as exc:
        if exc.err_code == _ERR_PASSWORD:
            raise DocumentError(name, "encrypted with a password; decrypt it first "
                                      "(e.g. qpdf --decrypt --password=PASSWORD in.pdf out.pdf)") from None
        if exc.err_code == _ERR_SECURITY:
            raise DocumentError(name, "uses an encryption PDFium does not support; decrypt it first "
                                      "(e.g. qpdf --decrypt in.pdf out.pdf)") from None
        detail = str(exc).partition("PDFium: ")[2].rstrip(").") or str(exc)
        raise DocumentError(name, f"damaged: not a readable PDF ({detail})") from None
    try:
        n_pages = len(doc)
        if n_pages > limits.max_pages:
            raise DocumentError(name, f"{n_pages:,} pages, more than the {limits.max_pages:,} lcrun reads from one "
                                      "PDF; give a part of it (e.g. qpdf in.pdf --pages . 1-400 -- part.pdf)")
        parts = TextParts(name, limits)
        empty = 0
        for index in range(n_pages):
            deadline.check(f"reading its pages ({index:,} of {n_pages:,} read)")
            try:
                page = doc[index]
                textpage = page.get_textpage()
                text = page_text(textpage.get_text_bounded())
                textpage.close()
                page.close()
            except pdfium.PdfiumError as exc:
                raise DocumentError(name, f"damaged: page {index + 1} cannot be read ({exc})") from None
            empty += not text
            parts.add(text, f"[page {index + 1}]\n{text}" if text else f"[page {index + 1}]")
    finally:
        doc.close()
    if n_pages == 0:
        raise DocumentError(name, "a PDF with no pages")
    if empty == n_pages:
        raise DocumentError(name, f"no text layer on any of its {n_pages:,} pages (scanned images?): OCR it first, "
                                  "e.g. ocrmypdf in.pdf out.pdf")
    warnings = []
    if empty:
        warnings.append(f"{empty:,} of {n_pages:,} pages have no text layer (scanned images?); OCR the PDF for "
                        "their text")
    return Document(name=name, kind="pdf", text=parts.joined(), label=label, pages=n_pages,
                    skipped={"pages without text": empty} if empty else {}, warnings=tuple(warnings),
                    source_bytes=size)
