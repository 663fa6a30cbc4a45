"""The document readers on documents the tests build: PDFs (many pages, two columns, hyphenated line ends,
encrypted, image-only, truncated, a huge page count), web pages with navigation and scripts around an article, Word
documents, EPUBs, standard input and URLs served on 127.0.0.1. Each asserts that the known sentences are in the
text, in order, and that the junk is not; every bad document is one line naming it."""
from __future__ import annotations

import io
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lcrun.documents import Document, DocumentError, ReadLimits, read_document
from tests.fixtures.cli import assert_one_line_error, invoke
from tests.fixtures.documents import (JUNK, body, docx_file, endless, epub_file, html_page, pdf_image_only,
                                      pdf_many_pages, pdf_pages, pdf_two_columns, redirect, sentence, trickle,
                                      web_server, zip_bomb)


def in_order(text: str, needles: list[str]) -> bool:
    """Every needle in `text`, each after the one before."""
    at = 0
    for needle in needles:
        found = text.find(needle, at)
        if found < 0:
            return False
        at = found + len(needle)
    return True


def test_in_order_can_fail() -> None:  # negative control for the order checks below
    assert in_order("a b c", ["a", "c"]) and not in_order("a b c", ["c", "a"]) and not in_order("a b", ["d"])


# -- PDF --------------------------------------------------------------------------------------------------------------
def test_pdf_pages_in_order_with_markers(tmp_path: Path) -> None:
    pages = [[sentence(3 * p + i) for i in range(3)] for p in range(12)]
    doc = read_document(str(pdf_pages(tmp_path / "many.pdf", pages)))
    assert (doc.kind, doc.pages, doc.label) == ("pdf", 12, "many.pdf")
    expected = []
    for p, lines in enumerate(pages):
        expected += [f"[page {p + 1}]", *lines]
    assert in_order(doc.text, expected)
    assert doc.text.startswith("[page 1]\n" + sentence(0)) and "\r" not in doc.text
    assert doc.context_text() == f'<document name="many.pdf">\n{doc.text}\n</document>'


def test_pdf_two_columns_read_column_by_column(tmp_path: Path) -> None:
    left = [f"Left column paragraph {i}: the apple harvest of year {1900 + i} was weighed in the old barn."
            for i in range(8)]
    right = [f"Right column paragraph {i}: the pear trees of row {i} were pruned before the frost came."
             for i in range(8)]
    doc = read_document(str(pdf_two_columns(tmp_path / "two.pdf", left, right)))
    flat = " ".join(doc.text.split())
    assert in_order(flat, [*left, *right])
    # no line mixes the columns
    assert not any("apple" in line and "pear" in line for line in doc.text.splitlines())


def test_pdf_hyphenated_line_ends_are_joined(tmp_path: Path) -> None:
    path = pdf_pages(tmp_path / "hyph.pdf", [["The lighthouse keeper wrote a careful docu-",
                                              "ment about the winter storms and the hyphen-",
                                              "ated words of his ledger."]])
    text = read_document(str(path)).text
    assert "document about" in text and "hyphenated words" in text
    assert "docu-" not in text and "\x02" not in text


def test_encrypted_pdf_is_one_line(tmp_path: Path) -> None:
    path = pdf_pages(tmp_path / "secret.pdf", [[sentence(1)]], encrypt="s3cret")
    assert b"/Encrypt" in path.read_bytes()  # it really is encrypted
    assert_one_line_error(invoke("read", str(path)), str(path), "encrypted with a password", "qpdf --decrypt")


def test_image_only_pdf_says_ocr_it_first(tmp_path: Path) -> None:
    path = pdf_image_only(tmp_path / "scan.pdf")
    assert b"/Image" in path.read_bytes()
    assert_one_line_error(invoke("read", str(path)), str(path), "no text layer on any of its 2 pages", "OCR it first")


def test_pdf_with_some_scanned_pages_warns(tmp_path: Path) -> None:
    mixed = pdf_pages(tmp_path / "mixed.pdf", [[sentence(1)], [], [sentence(2)]])
    doc = read_document(str(mixed))
    assert doc.skipped == {"pages without text": 1} and "1 of 3 pages have no text layer" in doc.warnings[0]
    assert in_order(doc.text, ["[page 1]", sentence(1), "[page 2]", "[page 3]", sentence(2)])


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_pdf_is_damaged(tmp_path: Path, keep: float) -> None:
    whole = pdf_pages(tmp_path / "whole.pdf", [[sentence(i)] for i in range(20)]).read_bytes()
    cut = tmp_path / "cut.pdf"
    cut.write_bytes(whole[:int(len(whole) * keep)])
    assert read_document(str(tmp_path / "whole.pdf")).pages == 20  # the whole file reads
    assert_one_line_error(invoke("read", str(cut)), str(cut), "damaged")


def test_garbage_after_the_pdf_magic_is_damaged(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 40 + b"\n%%EOF\n")
    assert_one_line_error(invoke("read", str(bad)), str(bad), "damaged: not a readable PDF")


def test_a_hundred_thousand_pages_are_refused_at_once(tmp_path: Path) -> None:
    path = pdf_many_pages(tmp_path / "huge.pdf", 100_000)
    start = time.monotonic()
    with pytest.raises(DocumentError, match=r"huge.pdf: 100,000 pages, more than the 10,000"):
        read_document(str(path))
    assert time.monotonic() - start < 30  # refused from the page count, not after reading the pages
    small = pdf_many_pages(tmp_path / "small.pdf", 3)  # the same construction, few pages: it opens
    with pytest.raises(DocumentError, match="no text layer on any of its 3 pages"):
        read_document(str(small))


def test_pdf_time_limit_stops_between_pages(tmp_path: Path) -> None:
    path = pdf_pages(tmp_path / "slow.pdf", [[sentence(i)] for i in range(5)])
    with pytest.raises(DocumentError, match=r"slow.pdf: took more than 0 s reading its pages"):
        read_document(str(path), replace(ReadLimits(), seconds=0))


def test_pdf_text_cap(tmp_path: Path) -> None:
    path = pdf_pages(tmp_path / "long.pdf", [[sentence(i)] for i in range(5)])
    with pytest.raises(DocumentError, match="more than 100 characters of text"):
        read_document(str(path), replace(ReadLimits(), max_chars=100))


# -- HTML -------------------------------------------------------------------------------------------------------------
ARTICLE = [sentence(i) + " The sea was grey and the lamp burned through the long northern night." for i in range(5)]


def test_html_main_text_without_navigation_or_scripts(tmp_path: Path) -> None:
    page = html_page("The Keeper's Ledger", ARTICLE)
    assert all(junk in page for junk in JUNK)  # the junk is there to be removed
    path = tmp_path / "saved.html"
    path.write_text(page, encoding="utf-8")
    doc = read_document(str(path))
    assert doc.kind == "html"
    assert in_order(doc.text, ["# The Keeper's Ledger", ARTICLE[0], "## The second part", *ARTICLE[1:]])
    assert not [junk for junk in JUNK if junk in doc.text]


def test_html_is_known_by_its_content_too(tmp_path: Path) -> None:
    path = tmp_path / "page.txt"
    path.write_text(html_page("Sniffed", ARTICLE), encoding="utf-8")
    assert read_document(str(path)).kind == "html"


def test_huge_files_are_refused_from_their_size(tmp_path: Path) -> None:
    html = tmp_path / "huge.html"
    with html.open("wb") as f:  # 2 GiB, sparse: nothing of it is on disk, and nothing is read
        f.write(b"<!doctype html><p>")
        f.truncate(2 << 30)
    start = time.monotonic()
    assert_one_line_error(invoke("read", str(html)), f"{html}: 2,048 MiB, more than the 64 MiB lcrun reads from one "
                                                     "HTML file")
    pdf = tmp_path / "huge.pdf"
    with pdf.open("wb") as f:
        f.write(b"%PDF-1.7\n")
        f.truncate(3 << 30)
    assert_one_line_error(invoke("read", str(pdf)), f"{pdf}: 3.0 GiB, more than the 2 GiB of PDF lcrun reads")
    assert time.monotonic() - start < 10


def test_html_over_the_cap_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "big.html"
    path.write_text(html_page("Big", ARTICLE * 50), encoding="utf-8")
    with pytest.raises(DocumentError, match=r"big.html: 0 MiB, more than the 0 MiB lcrun reads from one HTML file"):
        read_document(str(path), replace(ReadLimits(), max_file_bytes=1000))
    with pytest.raises(DocumentError, match=r"^stdin: more than the 0 MiB lcrun reads from one document"):
        read_document("-", replace(ReadLimits(), max_file_bytes=1000), stdin=io.BytesIO(path.read_bytes()))


# -- DOCX, EPUB -------------------------------------------------------------------------------------------------------
def test_docx_as_markdown(tmp_path: Path) -> None:
    path = docx_file(tmp_path / "report.docx", "Annual Ledger", ARTICLE[:3], [["ship", "count"], ["brig", "42"]])
    doc = read_document(str(path))
    assert doc.kind == "docx"
    assert in_order(doc.text, ["# Annual Ledger", ARTICLE[0], "## The second part", ARTICLE[1], ARTICLE[2],
                               "- first point of the list", "| ship | count |", "| brig | 42 |"])


def test_docx_zip_bomb_is_refused_before_unpacking(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.docx")
    assert bomb.stat().st_size < 1 << 20  # 64 MiB of zeros, packed
    assert_one_line_error(invoke("read", str(bomb)), str(bomb), "word/document.xml unpacks", "zip bomb")


def test_damaged_docx_is_one_line(tmp_path: Path) -> None:
    good = docx_file(tmp_path / "good.docx", "T", ARTICLE[:1], [["a", "b"]]).read_bytes()
    cut = tmp_path / "cut.docx"
    cut.write_bytes(good[: len(good) // 2])
    assert_one_line_error(invoke("read", str(cut)), str(cut), "damaged")


def test_epub_in_spine_order(tmp_path: Path) -> None:
    chapters = [(f"Chapter {i}", ARTICLE[i]) for i in range(4)]
    doc = read_document(str(epub_file(tmp_path / "book.epub", chapters)))
    assert (doc.kind, doc.pages) == ("epub", 4)
    assert in_order(doc.text, [part for heading, text in chapters for part in (heading, text)])


def test_other_zip_files_are_not_documents(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "code.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("src/main.py", "print(1)")
    assert_one_line_error(invoke("read", str(path)), "a zip archive, not a document")


# -- text, stdin ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_text_encodings(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nCafé au lait — " + sentence(1), encoding=encoding)
    doc = read_document(str(path))
    assert doc.kind == "text" and doc.text == "# Notes\n\nCafé au lait — " + sentence(1)


@pytest.mark.parametrize(("content", "problem"), [
    (b"\x89PNG\r\n\x1a\n\0\0\0IHDR", "a binary file"),
    ("caf\u00e9".encode("latin-1"), "not UTF-8 text"),
    (b" \n\t", "empty: nothing to add"),
])
def test_bad_text_files_are_one_line(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    assert_one_line_error(invoke("read", str(path)), f"{path}: {problem}")


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(invoke("read", str(tmp_path / "nothere.pdf")), "nothere.pdf: no such file or folder")


def test_stdin_text_and_pdf(tmp_path: Path) -> None:
    run = invoke("read", "-", stdin=sentence(1) + "\n")
    assert run.exit_code == 0 and run.stdout == f'<document name="stdin">\n{sentence(1)}\n</document>\n'
    pdf = pdf_pages(tmp_path / "p.pdf", [[sentence(2)]]).read_bytes()
    doc = read_document("-", stdin=io.BytesIO(pdf))
    assert (doc.kind, doc.pages, doc.name) == ("pdf", 1, "-") and sentence(2) in doc.text


# -- URLs -------------------------------------------------------------------------------------------------------------
def test_urls_of_each_kind(tmp_path: Path) -> None:
    pdf = pdf_pages(tmp_path / "p.pdf", [[sentence(7)]]).read_bytes()
    routes = {"/article": body(html_page("Web Ledger", ARTICLE).encode(), "text/html; charset=utf-8"),
              "/paper": body(pdf, "application/pdf"),
              "/notes.txt": body("Grüße — ".encode("latin-1", "replace") + b"plain", "text/plain; charset=latin-1"),
              "/moved": redirect("/article")}
    with web_server(routes) as base:
        article = read_document(f"{base}/moved")
        assert article.kind == "html" and article.label == f"{base}/moved"
        assert in_order(article.text, ["# Web Ledger", *ARTICLE]) and "NAVJUNK" not in article.text
        paper = read_document(f"{base}/paper")
        assert (paper.kind, paper.pages) == ("pdf", 1) and sentence(7) in paper.text
        notes = read_document(f"{base}/notes.txt")
        assert notes.kind == "text" and notes.text.startswith("Grüße")
        run = invoke("read", f"{base}/article", "--json")
        [listed] = __import__("json").loads(run.stdout)["documents"]
        assert listed["kind"] == "html" and listed["characters"] == article.characters


def test_bad_urls_are_one_line(tmp_path: Path) -> None:
    routes = {"/loop": redirect("/loop"), "/slow": trickle(0.2, 100), "/endless": endless(),
              "/image": body(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")}
    limits = replace(ReadLimits(), seconds=1.0, connect_seconds=2.0, max_url_bytes=1 << 20)
    with web_server(routes) as base:
        cases = [("/missing", "the server answered HTTP 404"), ("/loop", "more than 5 redirects"),
                 ("/slow", "took more than 1 s to download"), ("/endless", "more than the 1 MiB lcrun fetches"),
                 ("/image", "the server sent image/png, not a document")]
        for route, problem in cases:
            start = time.monotonic()
            with pytest.raises(DocumentError) as err:
                read_document(base + route, limits)
            assert str(err.value) == f"{base}{route}: {err.value.problem}" and problem in err.value.problem, err.value
            assert time.monotonic() - start < 10
    closed = base  # the server is gone now
    assert_one_line_error(invoke("read", closed + "/article"), "cannot be fetched")


def test_read_prints_every_document_then_summaries(tmp_path: Path) -> None:
    a = tmp_path / "a.md"
    a.write_text("alpha text")
    pdf = pdf_pages(tmp_path / "b.pdf", [[sentence(1)], [sentence(2)]])
    run = invoke("read", str(a), str(pdf))
    assert run.exit_code == 0
    assert run.stdout == ('<document name="a.md">\nalpha text\n</document>\n\n<document name="b.pdf">\n'
                          f"[page 1]\n{sentence(1)}\n\n[page 2]\n{sentence(2)}\n</document>\n")
    assert re.findall(r"^read .*$", run.stderr, re.M) == [f"read {a}: text, 10 characters",
                                                          f"read {pdf}: pdf, 2 pages, {len(read_document(str(pdf)).text)} characters"]


def test_a_bad_document_among_good_ones_prints_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.md"
    good.write_text("fine")
    run = invoke("read", str(good), str(tmp_path / "missing.md"))
    assert_one_line_error(run, "missing.md: no such file or folder")
    assert run.stdout == ""


def test_document_record_fields() -> None:
    doc = Document(name="x", kind="text", text="abc", label="x")
    assert doc.to_dict(5) == {"name": "x", "kind": "text", "label": "x", "pages": None, "files": None,
                              "characters": 3, "context_characters": len('<document name="x">\nabc\n</document>'),
                              "source_bytes": 0, "skipped": {}, "warnings": [], "tokens": 5}
