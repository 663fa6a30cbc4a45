"""HTML (a saved web page, a fetched URL): the main text without navigation, menus, scripts and footers, headings and
lists as Markdown — by trafilatura (Apache-2.0, maintained), over lxml's parser (libxml2 caps nesting). Chosen over
a Readability port (readability-lxml) because it writes the Markdown itself (a port gives cleaned HTML, and needs a
second library to turn it into text) and keeps headings, lists and tables."""
from __future__ import annotations

from typing import Any

from lcrun.errors import DocumentError

from .record import Document, ReadLimits, too_long


def _config(limits: ReadLimits) -> Any:
    from trafilatura.settings import use_config

    config = use_config()
    config.set("DEFAULT", "MAX_FILE_SIZE", str(limits.max_file_bytes))
    config.set("DEFAULT", "EXTRACTION_TIMEOUT", "0")   # its timeout uses signals (the CLI's only); ours is the size
    config.set("DEFAULT", "MIN_EXTRACTED_SIZE", "1")   # a short page is still a page
    config.set("DEFAULT", "MIN_OUTPUT_SIZE", "1")
    return config


def _as_article(data: bytes) -> Any:
    """The page with its whole body as the article: an e-book chapter is all content (trafilatura would take a
    chapter's heading for the page's title and leave it out)."""
    import lxml.html

    tree = lxml.html.fromstring(data)
    body = tree.find(".//body")
    if body is None:
        return tree
    article = lxml.html.Element("article")
    for child in list(body):
        article.append(child)
    article.text, body.text = body.text, None
    body.append(article)
    return tree


def html_text(data: bytes, name: str, limits: ReadLimits, *, all_content: bool = False) -> tuple[str, list[str]]:
    """(Markdown text of the page's main content — of all of it with `all_content` — and warnings)."""
    import trafilatura

    if len(data) > limits.max_file_bytes:
        raise DocumentError(name, f"{len(data) / (1 << 20):.0f} MiB of HTML, more than the "
                                  f"{limits.max_file_bytes >> 20} MiB lcrun reads from one page")
    source = _as_article(data) if all_content else data
    text = trafilatura.extract(source, output_format="markdown", include_comments=False, include_tables=True,
                               include_links=False, include_images=False, deduplicate=False, config=_config(limits))
    warnings = []
    if not text or not text.strip():
        # no article found (a page of links, a form): all of its visible text rather than nothing
        from trafilatura import html2txt

        text = html2txt(data)
        if text.strip():
            warnings.append("no main article found: the whole page's visible text was taken")
    if not text or not text.strip():
        raise DocumentError(name, "an HTML page with no text")
    if len(text) > limits.max_chars:
        raise too_long(name, limits)
    return text.strip(), warnings


def read_html(name: str, label: str, data: bytes, limits: ReadLimits) -> Document:
    text, warnings = html_text(data, name, limits)
    return Document(name=name, kind="html", text=text, label=label, warnings=tuple(warnings), source_bytes=len(data))
