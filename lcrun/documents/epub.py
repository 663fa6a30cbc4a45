"""E-books (.epub): the chapters in the book's reading order (its OPF spine), each an XHTML page read like HTML
(html.py). The zip container is checked first (archive.py); its two XML files are parsed by lxml with entities off
and no network."""
from __future__ import annotations

import posixpath
from typing import Any

from lcrun.errors import DocumentError

from .archive import open_zip, read_member
from .html import html_text
from .record import Deadline, Document, ReadLimits, TextParts

_XHTML = ("application/xhtml+xml", "text/html")


def _xml(data: bytes, name: str, member: str) -> Any:
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        return etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise DocumentError(name, f"damaged: {member} is not valid XML ({exc})") from None


def _local(tag: Any) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def read_epub(name: str, label: str, data: bytes, limits: ReadLimits) -> Document:
    deadline = Deadline(name, limits.seconds)
    with open_zip(name, limits, data=data) as archive:
        container = _xml(read_member(archive, "META-INF/container.xml", name), name, "META-INF/container.xml")
        rootfile = next((e.get("full-path") for e in container.iter() if _local(e.tag) == "rootfile"), None)
        if not rootfile:
            raise DocumentError(name, "damaged: META-INF/container.xml names no package file")
        opf = _xml(read_member(archive, rootfile, name), name, rootfile)
        base = posixpath.dirname(rootfile)
        manifest = {e.get("id"): (e.get("href") or "", e.get("media-type") or "")
                    for e in opf.iter() if _local(e.tag) == "item"}
        spine = [e.get("idref") for e in opf.iter() if _local(e.tag) == "itemref"]
        chapters = TextParts(name, limits)
        for idref in spine:
            href, media = manifest.get(idref, ("", ""))
            if not href or media not in _XHTML:
                continue
            deadline.check(f"reading its chapters ({len(chapters):,} read)")
            member = posixpath.normpath(posixpath.join(base, href.partition("#")[0]))
            try:
                text, _ = html_text(read_member(archive, member, name), f"{name}:{member}", limits, all_content=True)
            except DocumentError as exc:
                if exc.problem == "an HTML page with no text":  # a cover image, a blank page
                    continue
                raise
            chapters.add(text)
    if not chapters:
        raise DocumentError(name, "an e-book with no text in its chapters")
    return Document(name=name, kind="epub", text=chapters.joined(), label=label, pages=len(chapters),
                    source_bytes=len(data))
