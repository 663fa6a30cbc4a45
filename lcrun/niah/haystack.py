"""The haystack: the text lcrun ships (generated essays), or any document as `lcrun read` reads it — a text, a PDF,
HTML, DOCX, EPUB, a folder, a URL, standard input — turned once into a token stream long enough for the largest
context (repeated when the text is shorter), with the positions where a sentence ends."""
from __future__ import annotations

import hashlib
import math
import re
from bisect import bisect_right
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from . import NiahError

_SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*\s*$")
_CHARS_PER_TOKEN_BOUND = 8  # no tokenizer averages more: a prefix this long holds enough tokens


def default_haystack_path() -> Path:
    return Path(str(files("lcrun.models") / "haystack" / "essays.txt"))


@dataclass(frozen=True)
class Haystack:
    path: Path | str          # the file, folder or URL it was read from
    text: str
    sha256: str


def read_haystack(source: Path | str | None = None) -> Haystack:
    """The shipped essays, or the document `source` names, read by lcrun.documents' readers: its text (page markers
    and file headers included, as the model would see it in a chat) without the <document> tag around it."""
    if source is None:
        path = default_haystack_path()
        data = path.read_bytes()
        return Haystack(path, data.decode("utf-8").replace("\r\n", "\n").strip(), hashlib.sha256(data).hexdigest())
    from lcrun.documents import read_document

    document = read_document(str(source))   # a DocumentError (one line naming it) when it cannot be read
    text = document.text.replace("\r\n", "\n").strip()
    if not text:
        raise NiahError(source, "the haystack is empty")
    return Haystack(source, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


@dataclass(frozen=True)
class HaystackStream:
    tokens: list[int]
    boundaries: list[int]     # sorted token indices where a sentence or a line starts (0, each copy's start too)
    copies: int               # copies of the file in the stream: 1 = not repeated
    file_tokens: int | None   # tokens in one whole copy; None when only the file's beginning was needed
    pieces: dict[int, str]    # the text of each token id in the stream

    def nearest_boundary(self, position: float, end: int) -> int:
        """The sentence boundary closest to `position` (the earlier one on a tie), not beyond `end`."""
        i = bisect_right(self.boundaries, position)
        before = self.boundaries[i - 1]
        after = self.boundaries[i] if i < len(self.boundaries) else end + 1
        return after if after <= end and after - position < position - before else before

    def space_before(self, index: int) -> bool:
        """Whether the text before token `index` ends in whitespace (or there is none)."""
        return index == 0 or self.pieces[self.tokens[index - 1]][-1:].isspace()

    def space_after(self, index: int, end: int) -> bool:
        """Whether the text from token `index` on starts with whitespace (or the haystack ends there)."""
        return index >= end or self.pieces[self.tokens[index]][:1].isspace()


def build_stream(engine: Any, haystack: Haystack, needed: int) -> HaystackStream:
    """At least `needed` tokens of the haystack in the engine's tokenizer. Only the file's beginning is tokenized
    when that is enough; a file too short for `needed` is repeated, copies separated by a blank line."""
    text = haystack.text
    limit = needed * _CHARS_PER_TOKEN_BOUND + 4096
    tokens: list[int] = []
    whole = len(text) <= limit
    if not whole:
        cut = text.rfind("\n\n", 0, limit)
        tokens = engine.tokenize(text[: cut if cut > 0 else limit], special=False, add_bos=False)
        whole = len(tokens) < needed
    if whole:
        tokens = engine.tokenize(text + "\n\n", special=False, add_bos=False)
    if not tokens:
        raise NiahError(haystack.path, "the haystack has no tokens")
    pieces = {token: engine.detokenize([token]) for token in set(tokens)}
    base = _sentence_boundaries(tokens, pieces)
    copies = math.ceil(needed / len(tokens)) if whole else 1
    return HaystackStream(
        tokens=tokens * copies,
        boundaries=[b + k * len(tokens) for k in range(copies) for b in base],
        copies=copies, file_tokens=len(tokens) if whole else None, pieces=pieces,
    )


def _sentence_boundaries(tokens: list[int], pieces: dict[int, str]) -> list[int]:
    """After a sentence's end followed by whitespace, and after a line break (a title, a paragraph)."""
    found = [0]
    for i, token in enumerate(tokens):
        piece = pieces[token]
        after = pieces[tokens[i + 1]] if i + 1 < len(tokens) else " "
        if piece.endswith("\n") and not after.startswith("\n"):
            found.append(i + 1)
        elif _SENTENCE_END.search(piece) and (piece[-1:].isspace() or after[:1].isspace()):
            found.append(i + 1)
    return found
