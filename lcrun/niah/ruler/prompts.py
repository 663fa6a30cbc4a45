"""The suite's prompts as token lists, fitted to a context length in the model's own tokens.

A prompt is `head + document + tail`: the head is the chat format's opening and the task's instruction, the tail
the question, the chat format's close and the answer's first words (RULER writes its answer_prefix for chat and
base models alike). The three parts are tokenized apart and joined, so the five essay tasks of one (length, sample)
share `head + document` token for token and an engine that keeps its KV cache prefills that document once.

A length counts the whole sequence, as RULER's max_seq_length does: prompt plus the answer's token budget. A
length's prompts therefore fit an engine context of that length, and an effective context measured with them is a
`-c` value as it stands."""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lcrun.chat.template import ChatRenderer

from .. import NiahError
from ..haystack import Haystack, HaystackStream, build_stream
from .tasks import (CWE_COMMON, CWE_PREAMBLE, ESSAY_PREAMBLE, ESSAY_TASKS, Insert, Question, WordList, cwe_question,
                    essay_sample, word_list)

_DOCUMENT = "\ue000lcrun-ruler-document\ue000"  # private-use characters: no template trims or escapes them


class Tokenizer(Protocol):
    """What the suite needs of a model's tokenizer (lcrun.engine's Engine has it). Prompts are built cell by cell:
    it must stay usable for the whole run."""

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class SuitePrompt:
    task: str
    ctx: int
    sample: int
    tokens: list[int]
    doc_start: int
    doc_end: int             # tokens[:doc_end] is what the prompts of one document share
    question: Question

    @property
    def doc_tokens(self) -> int:
        return self.doc_end - self.doc_start


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, renderer: ChatRenderer, haystack: Haystack, *, seed: int,
                 max_ctx: int) -> None:
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.haystack = haystack
        self.seed = seed
        self.stream: HaystackStream = build_stream(tokenizer, haystack, max_ctx)
        self._numbers: list[list[int]] = [[]]      # tokens of each list number: "1.", " 2.", …
        self._words: dict[str, list[int]] = {}

    def prompts(self, ctx: int, sample: int, tasks: Sequence[str]) -> list[SuitePrompt]:
        """The prompts of one (length, sample), the essay tasks first (they share their document), in TASKS order."""
        built = self.essay(ctx, sample) if any(t in ESSAY_TASKS for t in tasks) else []
        if "cwe" in tasks:
            built.append(self.cwe(ctx, sample))
        return [p for p in built if p.task in tasks]

    # -- the frame around a document ---------------------------------------------------------------------------
    def _frame(self, preamble: str, question: Question) -> tuple[list[int], list[int]]:
        text = self.renderer.render([{"role": "user", "content": f"{preamble}\n{_DOCUMENT}\n{question.question}"}])
        if text.count(_DOCUMENT) != 1:
            raise NiahError("chat format", "does not keep the user's message verbatim; cannot place the document")
        head, tail = text.split(_DOCUMENT)
        prefix = question.answer_prefix.lstrip() if tail[-1:].isspace() else question.answer_prefix
        return self.tokenizer.tokenize(head, special=True), self.tokenizer.tokenize(tail + prefix, special=True)

    def _budget(self, ctx: int, head: list[int], tails: list[list[int]], questions: Sequence[Question]) -> int:
        room = max(len(tail) + q.max_tokens for tail, q in zip(tails, questions))
        budget = ctx - len(head) - room
        if budget < 1:
            raise NiahError("context", f"{ctx:,} tokens cannot hold the instruction, the question and the answer "
                                       f"({len(head) + room:,} tokens) and any document")
        return budget

    # -- the essay tasks: one document, five questions ---------------------------------------------------------
    def essay(self, ctx: int, sample: int) -> list[SuitePrompt]:
        drawn = essay_sample(self.seed, ctx, sample, self.haystack.text)
        frames = [self._frame(ESSAY_PREAMBLE, q) for q in drawn.questions]
        head = frames[0][0]
        if any(h != head for h, _ in frames):
            raise NiahError("chat format", "renders the opening differently for each question; the tasks cannot "
                                           "share their document")
        tails = [tail for _, tail in frames]
        document = self._essay_document(drawn.inserts, self._budget(ctx, head, tails, drawn.questions), ctx)
        start, end = len(head), len(head) + len(document)
        return [SuitePrompt(q.task, ctx, sample, head + document + tail, start, end, q)
                for q, tail in zip(drawn.questions, tails)]

    def _essay_document(self, inserts: Sequence[Insert], budget: int, ctx: int) -> list[int]:
        tokenized = {i.text: len(self.tokenizer.tokenize(f" {i.text} ", special=False)) for i in inserts}
        hay = budget - sum(tokenized.values())
        for _ in range(4):   # the spacing of a needle can cost a token more than its bound: shrink and retry
            if hay < 1:
                raise NiahError("context", f"{ctx:,} tokens cannot hold the {len(inserts)} needles "
                                           f"({sum(tokenized.values()):,} tokens) and the questions")
            if hay > len(self.stream.tokens):
                raise NiahError("haystack", f"{len(self.stream.tokens):,} tokens prepared, {hay:,} needed")
            document = self._place(inserts, hay)
            if len(document) <= budget:
                return document
            hay -= len(document) - budget
        raise NiahError("context", f"{ctx:,} tokens: the document does not fit its {budget:,} tokens")

    def _place(self, inserts: Sequence[Insert], hay: int) -> list[int]:
        """The haystack cut at the last sentence end within `hay` tokens, each insert at the sentence start nearest
        its depth, with a space before and after where the text around it has none."""
        stream = self.stream
        boundary = stream.boundaries[bisect_right(stream.boundaries, hay) - 1]
        end = boundary if boundary > 0 else hay
        at = [end if i.depth >= 1.0 else stream.nearest_boundary(i.depth * end, end) for i in inserts]
        document: list[int] = []
        last = 0
        for n, (insert, position) in enumerate(zip(inserts, at)):
            document += stream.tokens[last:position]
            last = position
            after_insert = n > 0 and at[n - 1] == position
            before_insert = n + 1 < len(at) and at[n + 1] == position
            lead = " " if after_insert or not stream.space_before(position) else ""
            trail = "" if before_insert or stream.space_after(position, end) else " "
            document += self.tokenizer.tokenize(lead + insert.text + trail, special=False)
        return document + stream.tokens[last:end]

    # -- common words: its own document -----------------------------------------------------------------------
    def cwe(self, ctx: int, sample: int) -> SuitePrompt:
        words = word_list(self.seed, ctx, sample)
        question = cwe_question(words)
        head, tail = self._frame(f"{words.example}\n{CWE_PREAMBLE}", question)
        budget = self._budget(ctx, head, [tail], [question])
        n_others = self._fit_words(words, budget, ctx)
        document: list[int] = []
        for number, word in enumerate(words.entries(n_others, self.seed, ctx, sample), 1):
            document += self._number(number) + self._word(word)
        return SuitePrompt("cwe", ctx, sample, head + document + tail, len(head), len(head) + len(document),
                           question)

    def _number(self, number: int) -> list[int]:
        while len(self._numbers) <= number:
            n = len(self._numbers)
            self._numbers.append(self.tokenizer.tokenize(f"{n}." if n == 1 else f" {n}.", special=False))
        return self._numbers[number]

    def _word(self, word: str) -> list[int]:
        if word not in self._words:
            self._words[word] = self.tokenizer.tokenize(f" {word}", special=False)
        return self._words[word]

    def _fit_words(self, words: WordList, budget: int, ctx: int) -> int:
        """How many words beside the common ones the list holds within `budget` tokens (RULER searches the same
        number by tokenizing whole lists)."""
        common, other = words.repeats
        entries = CWE_COMMON * common
        used = common * sum(len(self._word(w)) for w in words.common)
        used += sum(len(self._number(i)) for i in range(1, entries + 1))
        if used > budget:
            raise NiahError("context", f"{ctx:,} tokens cannot hold the common-words list ({used:,} tokens for its "
                                       "common words alone)")
        n = 0
        while True:
            words.more(n + 1)
            step = other * len(self._word(words.others[n]))
            step += sum(len(self._number(entries + k)) for k in range(1, other + 1))
            if used + step > budget:
                return n
            used += step
            entries += other
            n += 1
