"""Chat replies coming back as the next request's history keep the tokens they were sampled as.

A client sends the whole conversation every turn, the assistant's last reply as text. Tokenized again, that text
need not give the tokens the model sampled (a model may spell a word in unusual pieces), and the KV cache, which
holds the sampled ones, would be reused only up to where they differ — early in the reply, so the reply and everything
after it would be evaluated again. So the server remembers, for recent chat replies, the rendered prompt plus the
reply (and its end-of-turn token) with the tokens it holds for them, and a later prompt that starts with such a text
at a token boundary (the rest tokenizes the same alone as within the whole) takes those tokens for it. Each API key's
replies are its own (`partition`): another key's request never takes them, so its token counts cannot tell whether
some other client received a given reply. `lcrun chat` does the same for its one conversation
(`PromptTokenizer.remember`)."""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

MAX_CHARS = 64 << 20


class ReplyMemory:
    def __init__(self, entries: int = 16) -> None:
        self._entries: deque[tuple[str | None, str, list[int]]] = deque(maxlen=entries)
        self._lock = threading.Lock()

    def remember(self, text: str, tokens: list[int], partition: str | None = None) -> None:
        with self._lock:
            if sum(len(t) for _, t, _ in self._entries) + len(text) > MAX_CHARS:
                self._entries.clear()
            self._entries.append((partition, text, tokens))

    def tokenize(self, text: str, tokenize: Callable[[str], list[int]], partition: str | None = None) -> list[int]:
        whole = tokenize(text)
        with self._lock:
            entries = [(t, tokens) for p, t, tokens in reversed(self._entries) if p == partition]
        best: list[int] | None = None
        best_chars = -1
        for known, tokens in entries:
            if len(known) <= best_chars or not text.startswith(known):
                continue
            rest = text[len(known):]
            tail = tokenize(rest) if rest else []
            if not tail or whole[len(whole) - len(tail):] == tail:
                best, best_chars = tokens + tail, len(known)
        return whole if best is None else best
