"""One cell's prompt: the haystack cut to the context length, the needle at a sentence boundary near the depth, the
question after it, all inside the model's chat format (or, with --raw, as plain text ending in a sentence for the
model to complete). Built from token slices of one stream, so every prompt of a
context length shares, token for token, the haystack before its needle with the others."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lcrun.chat.template import ChatRenderer

from . import NiahError
from .grid import Cell
from .haystack import HaystackStream

NEEDLE = "The special magic {city} number is: {number}."
QUESTION = "What is the special magic {city} number mentioned in the text above? Answer with the number only."
# --raw: a base model is not asked, it completes; the answer is scored the same way (the number in it)
COMPLETION = "Question: What is the special magic {city} number mentioned in the text above?\nAnswer: The special " \
             "magic {city} number is"
CITIES = ["Lisbon", "Nairobi", "Oslo", "Quito", "Hanoi", "Lima", "Tbilisi", "Dakar", "Auckland", "Montreal",
          "Seville", "Kyoto", "Tallinn", "Havana", "Cusco", "Bergen", "Marrakesh", "Valparaiso", "Krakow", "Manila"]
PROMPT_FORMAT = 1  # bump when NEEDLE, QUESTION, CITIES or the layout change: old results no longer compare
_DOCUMENT = "\ue000lcrun-niah-document\ue000"  # private-use characters: no template trims or escapes them


@dataclass(frozen=True)
class Needle:
    number: str
    city: str

    @property
    def sentence(self) -> str:
        return NEEDLE.format(city=self.city, number=self.number)

    @property
    def question(self) -> str:
        return QUESTION.format(city=self.city)

    @property
    def completion(self) -> str:
        return COMPLETION.format(city=self.city)


def needle_for(cell: Cell, seed: int, digits: int) -> Needle:
    """The same cell always gets the same needle: a resumed run asks what the interrupted one would have."""
    if digits < 1:
        raise NiahError("--digits", f"{digits} must be at least 1")
    rng = random.Random(f"lcrun-niah:{seed}:{cell.ctx}:{cell.depth:.6f}:{cell.sample}")
    return Needle(number=str(rng.randrange(10 ** (digits - 1), 10**digits)), city=rng.choice(CITIES))


@dataclass(frozen=True)
class NiahPrompt:
    tokens: list[int]
    doc_start: int        # where the document (haystack with needle) begins in `tokens`
    doc_tokens: int
    needle_at: int        # where the needle begins, counted from the document's start
    needle_tokens: int
    depth_actual: float   # needle_at over the haystack's length: the depth, moved to the nearest sentence start


class PromptBuilder:
    def __init__(self, engine: Any, template: ChatRenderer, *, completion: bool = False) -> None:
        """`completion`: the prompt ends in COMPLETION rather than asking QUESTION (for --raw)."""
        self.engine = engine
        self.template = template
        self.question = COMPLETION if completion else QUESTION
        self.head_tokens, _ = self._frame(CITIES[0])
        self._tails: dict[str, list[int]] = {}

    def _frame(self, city: str) -> tuple[list[int], list[int]]:
        """Tokens of the rendered template before and after the document, for the question about `city`."""
        question = self.question.format(city=city)
        text = self.template.render([{"role": "user", "content": f"{_DOCUMENT}\n\n{question}"}])
        if text.count(_DOCUMENT) != 1:
            raise NiahError("chat format", "does not keep the user's message verbatim; cannot place the document")
        head, tail = text.split(_DOCUMENT)
        return self.engine.tokenize(head, special=True), self.engine.tokenize(tail, special=True)

    def tail_tokens(self, city: str) -> list[int]:
        if city not in self._tails:
            self._tails[city] = self._frame(city)[1]
        return self._tails[city]

    def needle_length(self, needle: Needle) -> int:
        """The needle's length in tokens as it is counted against the context (with its leading space)."""
        return len(self.engine.tokenize(" " + needle.sentence, special=False))

    def overhead(self, answer_tokens: int) -> int:
        """Tokens a prompt needs beyond its document, answer included: the room to keep free in the context."""
        longest_tail = max(len(self.tail_tokens(city)) for city in CITIES)
        return len(self.head_tokens) + longest_tail + answer_tokens + 2  # +2: the needle's spacing varies by one

    def build(self, stream: HaystackStream, cell: Cell, needle: Needle) -> NiahPrompt:
        length = cell.ctx - self.needle_length(needle)
        if length < 1:
            raise NiahError("--min-ctx", f"{cell.ctx:,} tokens cannot hold the needle "
                                         f"({self.needle_length(needle)} tokens)")
        if length > len(stream.tokens):
            raise NiahError("haystack", f"{len(stream.tokens):,} tokens prepared, {length:,} needed")
        if cell.depth >= 1.0:
            at = length
        else:
            at = stream.nearest_boundary(cell.depth * length, length)
        lead = "" if stream.space_before(at) else " "
        trail = "" if stream.space_after(at, length) else " "
        needle_tokens = self.engine.tokenize(lead + needle.sentence + trail, special=False)
        document = stream.tokens[:at] + needle_tokens + stream.tokens[at:length]
        head = self.head_tokens
        return NiahPrompt(
            tokens=head + document + self.tail_tokens(needle.city), doc_start=len(head), doc_tokens=len(document),
            needle_at=at, needle_tokens=len(needle_tokens), depth_actual=round(at / length, 4),
        )
