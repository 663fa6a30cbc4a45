"""Tokenizing the whole conversation every turn, cheaply: llama.cpp splits text at special tokens before running BPE
on each fragment, so the prompt's tokens are the concatenation of its fragments' tokens — and fragments that were in
the last prompt (a 100K-token document above all) are not tokenized again."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_CANDIDATES = re.compile(r"<\|[^|<>\s]{1,48}\|>|<｜[^｜<>\s]{1,48}｜>|\[/?[A-Z_]{3,24}\]|</?s>|<[be]os>|"
                         r"<start_of_turn>|<end_of_turn>")
_MEMO_CHARS = 64 << 20


class PromptTokenizer:
    def __init__(self, tokenize: Callable[[str], list[int]], token_text: Callable[[int], str],
                 special_texts: Iterable[str], *, probe: str = "") -> None:
        self._tokenize = tokenize
        self._memo: dict[str, list[int]] = {}
        specials = sorted({t for t in special_texts if t and _is_single_token(tokenize, token_text, t)},
                          key=len, reverse=True)
        self._specials = tuple(specials)
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        if self._split is not None and probe and self._pieces(probe) != tokenize(probe):
            self._split = None  # this vocabulary does not tokenize fragments independently: do it whole
        self._known: tuple[str, list[int]] | None = None

    @classmethod
    def for_template(cls, tokenize: Callable[[str], list[int]], token_text: Callable[[int], str],
                     template_source: str, extra: Iterable[str], probe: str) -> PromptTokenizer:
        """Special tokens are looked for in the template and in a conversation it rendered (`probe`): a built-in
        format's source is only its name."""
        candidates = [*_CANDIDATES.findall(template_source), *_CANDIDATES.findall(probe), *extra]
        return cls(tokenize, token_text, candidates, probe=probe)

    def remember(self, text: str, tokens: list[int]) -> None:
        """`text` is what these tokens stand for — e.g. a prompt and the reply the model generated to it, whose
        sampled tokens need not be the ones re-tokenizing the reply would give. A later prompt that starts with
        `text` at a special-token boundary reuses them, so the KV cache holding them is reused too."""
        self._known = (text, list(tokens))

    def __call__(self, text: str) -> list[int]:
        if self._split is None:
            return self._tokenize(text)
        if self._known is not None:
            known, tokens = self._known
            rest = text[len(known):]
            if text.startswith(known) and (known.endswith(self._specials) or rest.startswith(self._specials)):
                return tokens + (self._pieces(rest) if rest else [])
        return self._pieces(text)

    def _pieces(self, text: str) -> list[int]:
        assert self._split is not None
        out: list[int] = []
        seen: dict[str, list[int]] = {}
        for piece in self._split.split(text):
            if not piece:
                continue
            tokens = seen.get(piece) or self._memo.get(piece)
            if tokens is None:
                tokens = self._tokenize(piece)
            seen[piece] = tokens
            out += tokens
        if sum(map(len, self._memo)) + sum(map(len, seen)) > _MEMO_CHARS:
            self._memo = {}
        self._memo.update(seen)
        return out


def _is_single_token(tokenize: Callable[[str], list[int]], token_text: Callable[[int], str], text: str) -> bool:
    tokens = tokenize(text)
    return len(tokens) == 1 and token_text(tokens[0]) == text
