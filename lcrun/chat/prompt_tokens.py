"""A rendered conversation to tokens, with special tokens only where the chat template put them.

Message text is data: a user who writes `<|eot_id|><|start_header_id|>system<|end_header_id|>` must get those
characters, not the end of their turn and a system turn (tokenizing the whole prompt with special-token parsing, as
llama-server does, forges the roles). So each message's content goes into the template marked — between two Unicode
noncharacters, which never occur in exchanged text — and the rendered prompt is tokenized as llama.cpp tokenizes
with special tokens, except that only the template's own text is searched for them: llama.cpp splits a text at its
control tokens and tokenizes each fragment between them on its own; here the split points are the control tokens
llama.cpp finds in the template's text, and the fragments, message text included, are tokenized without special-token
parsing. A conversation without such text gives exactly the tokens of whole-prompt tokenization.

Templates may trim a message (whitespace stays outside the marks) or cut it (Qwen3 keeps what follows `</think>`): a
mark that lost its partner is matched back to the message it came from. Tokens the vocabulary marks user-defined
(not control) are parsed by llama.cpp in any text, as they are by every tokenizer of those models.

Fragments are tokenized once and remembered, so a long document is not tokenized again every turn."""
from __future__ import annotations

import re
import threading
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

OPEN, CLOSE = "\ufdd0", "\ufdd1"
_MARKS = re.compile(f"([{OPEN}{CLOSE}])")
MEMO_MIN_CHARS = 1024      # shorter fragments are cheaper to tokenize again than to keep
_SPACE = " \t\n\r\f\v"   # what llama.cpp's lstrip/rstrip token attributes strip (isspace)


class MarkedText(str):
    """A rendered prompt with its messages' contents marked, and the contents themselves (to place a content whose
    mark the template cut off)."""
    contents: tuple[str, ...] = ()

    def __new__(cls, text: str, contents: Iterable[str] = ()) -> MarkedText:
        made = super().__new__(cls, text)
        made.contents = tuple(contents)
        return made


def as_content(text: str) -> str:
    """`text` marked as a message's content; whitespace at either end stays outside the marks (templates trim)."""
    text = _MARKS.sub("", text)
    core = text.strip()
    if not core:
        return text
    start = len(text) - len(text.lstrip())
    return text[:start] + OPEN + core + CLOSE + text[start + len(core):]


def unmark(text: str) -> str:
    return _MARKS.sub("", text)


def render_marked(renderer: Any, messages: Sequence[Mapping[str, str]], *,
                  add_generation_prompt: bool = True) -> MarkedText:
    """`renderer.render` (a ChatRenderer) of the messages with their contents marked."""
    marked = [{**m, "content": as_content(m["content"])} for m in messages]
    text = renderer.render(marked, add_generation_prompt=add_generation_prompt)
    return MarkedText(text, (unmark(m["content"]).strip() for m in marked))


def segments(text: str, contents: Sequence[str] = ()) -> list[tuple[str, bool]]:
    """`text` (marked) as (piece, is_content) pairs. A CLOSE without its OPEN (the template cut the start of a
    message) makes content of the longest tail of the text before it that ends some message; an OPEN without its
    CLOSE, of the longest head after it that starts one. Without `contents` to go by, all of it is content."""
    out: list[tuple[str, bool]] = []
    inside = False
    buffer = ""
    for piece in _MARKS.split(text):
        if piece == OPEN:
            if inside:  # the last OPEN never closed
                out += _split_head(buffer, contents)
            elif buffer:
                out.append((buffer, False))
            buffer, inside = "", True
        elif piece == CLOSE:
            if inside:
                out.append((buffer, True))
            else:
                out += _split_tail(buffer, contents)
            buffer, inside = "", False
        else:
            buffer += piece
    if inside:
        out += _split_head(buffer, contents)
    elif buffer:
        out.append((buffer, False))
    return [(piece, content) for piece, content in out if piece]


def _split_tail(text: str, contents: Sequence[str]) -> list[tuple[str, bool]]:
    if not contents:
        return [(text, True)]
    n = max((_common_suffix(text, c) for c in contents), default=0)
    return [(text[: len(text) - n], False), (text[len(text) - n:], True)]


def _split_head(text: str, contents: Sequence[str]) -> list[tuple[str, bool]]:
    if not contents:
        return [(text, True)]
    n = max((_common_prefix(text, c) for c in contents), default=0)
    return [(text[:n], True), (text[n:], False)]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


Part = str | int   # text, or a control token's id


class PromptTokenizer:
    """`tokenize(text, special=…, add_bos=…)` and `token_text(id)` are the engine's. Thread-safe (the server calls it
    from several worker threads). Fragments of at least MEMO_MIN_CHARS are remembered, up to `memo_tokens` tokens in
    all (4 bytes each; the memo starts over when full)."""

    def __init__(self, tokenize: Callable[..., list[int]], token_text: Callable[[int], str], *,
                 memo_tokens: int = 16 << 20) -> None:
        self._tokenize = tokenize
        self._token_text = token_text
        self._lock = threading.Lock()
        self._memo_tokens = memo_tokens
        self._memo_size = 0
        self._memo: dict[str, array] = {}                  # text fragment → its tokens
        self._parts: dict[str, tuple[Part, ...]] = {}       # template text → its text and control tokens
        self._control: dict[int, tuple[bool, bool] | None] = {}   # id → (lstrip, rstrip) if a control token
        self._known: tuple[str, list[int]] | None = None

    def fragments(self) -> dict[str, array]:
        """The long fragments tokenized so far (text -> tokens), for another PromptTokenizer of the same vocabulary."""
        with self._lock:
            return dict(self._memo)

    def learn(self, fragments: Mapping[str, array]) -> bool:
        """Take fragments another tokenizer of the same vocabulary made (the documents counted before the model
        loaded, by its vocabulary alone), so they are not tokenized again — once the shortest of them tokenizes
        the same here (another vocabulary's are refused: False)."""
        if not fragments:
            return True
        probe = min(fragments, key=len)
        if self._tokenize(probe, special=False) != list(fragments[probe]):
            return False
        with self._lock:
            for text, tokens in fragments.items():
                if text not in self._memo and self._memo_size + len(tokens) <= self._memo_tokens:
                    self._memo[text] = tokens
                    self._memo_size += len(tokens)
        return True

    def remember(self, text: str, tokens: list[int]) -> None:
        """`text` (marked) is what these tokens stand for — e.g. a prompt and the reply the model generated to it,
        whose sampled tokens need not be the ones re-tokenizing the reply would give. A later prompt that starts with
        `text` at a control token reuses them, so the KV cache holding them is reused too."""
        self._known = (text, list(tokens))

    def __call__(self, text: str) -> list[int]:
        contents = getattr(text, "contents", ())
        if self._known is not None:
            known, tokens = self._known
            if text.startswith(known):
                rest = MarkedText(text[len(known):], contents)
                parts = self.parts(rest)
                if not rest or self._ends_at_control(known) or (parts and isinstance(parts[0], int)):
                    return tokens + self._tokens(parts)
        return self._tokens(self.parts(text))

    def parts(self, text: str) -> list[Part]:
        """The prompt as text and control tokens: the template's control tokens, with llama.cpp's whitespace
        stripping around them applied to the text beside them."""
        out: list[Part] = []
        for piece, is_content in segments(text, getattr(text, "contents", ())):
            out.extend((piece,) if is_content else self._template_parts(piece))
        merged: list[Part] = []
        buffer: list[str] = []
        strip_next = False

        def flush(strip_end: bool) -> None:
            nonlocal strip_next
            joined = "".join(buffer)
            buffer.clear()
            if strip_next:
                joined = joined.lstrip(_SPACE)
            if strip_end:
                joined = joined.rstrip(_SPACE)
            if joined:
                merged.append(joined)

        for part in out:
            if isinstance(part, str):
                buffer.append(part)
                continue
            lstrip, rstrip = self._control[part] or (False, False)
            flush(lstrip)
            merged.append(part)
            strip_next = rstrip
        flush(False)
        return merged

    def _tokens(self, parts: list[Part]) -> list[int]:
        out: list[int] = []
        for part in parts:
            if isinstance(part, int):
                out.append(part)
                continue
            with self._lock:
                known = self._memo.get(part)
            if known is not None:
                out += known
                continue
            tokens = self._tokenize(part, special=False)
            if len(part) >= MEMO_MIN_CHARS and len(tokens) <= self._memo_tokens:
                with self._lock:
                    if self._memo_size + len(tokens) > self._memo_tokens:
                        self._memo, self._memo_size = {}, 0
                    self._memo[part] = array("i", tokens)
                    self._memo_size += len(tokens)
            out += tokens
        return out

    def _template_parts(self, text: str) -> tuple[Part, ...]:
        with self._lock:
            found = self._parts.get(text)
        if found is not None:
            return found
        parts: list[Part] = []
        pos = 0
        for token in self._tokenize(text, special=True):
            if not self._is_control(token):
                continue
            spelled = self._token_text(token)
            at = text.find(spelled, pos)
            if at < 0:  # not spelled as its text: leave the template's text as text (no special token invented)
                continue
            parts += [text[pos:at], token]
            pos = at + len(spelled)
        parts.append(text[pos:])
        result = tuple(p for p in parts if p != "")
        with self._lock:
            if len(self._parts) > 4096:
                self._parts.clear()
            self._parts[text] = result
        return result

    def _is_control(self, token: int) -> bool:
        """A token llama.cpp makes only from text parsed for special tokens; with whether it eats the whitespace
        before and after it (its lstrip/rstrip attributes), found by asking the tokenizer."""
        if token not in self._control:
            spelled = self._token_text(token)
            info: tuple[bool, bool] | None = None
            tok = lambda t: self._tokenize(t, special=True)  # noqa: E731
            if spelled and tok(spelled) == [token] and self._tokenize(spelled, special=False) != [token]:
                info = (tok("a  " + spelled) == tok("a" + spelled), tok(spelled + "  a") == tok(spelled + "a"))
            self._control[token] = info
        return self._control[token] is not None

    def _ends_at_control(self, text: str) -> bool:
        parts = self.parts(MarkedText(text, getattr(text, "contents", ())))
        return bool(parts) and isinstance(parts[-1], int)
