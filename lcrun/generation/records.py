"""The one request record and the one finish record of every generation — chat, niah, bench and serve alike — and
the events a request streams: `PrefillProgress` while its prompt is evaluated, `TextChunk`s of the reply, then one
`Finished` (or `Failed`, when llama.cpp refused a decode).

A `Request` is prompt tokens plus `GenerationParams`: the sampler settings (seed included), `max_tokens` (its one
home), stop strings, `ignore_eos`, a grammar the reply must follow (a JSON schema's, tool calls'), the
log-probabilities to report, how many choices to generate from the one prompt — and a draft source for speculative
decoding, which `check` refuses by name until it is built, instead of ignoring it. `check` bounds each."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from lcrun.engine.protocol import Grammar, Sampling
from lcrun.errors import LcrunError

MAX_STOP_STRINGS = 16     # stop strings per request
MAX_STOP_BYTES = 256      # UTF-8 bytes per stop string: the matcher holds back at most this much text
MAX_TOP_LOGPROBS = 20     # alternatives per token, as OpenAI's API allows
MAX_CHOICES = 16          # choices per request (a server runs at most one a slot)
MAX_GRAMMAR_BYTES = 256 << 10   # a GBNF grammar's text
MAX_GRAMMAR_NESTING = 1024      # parentheses inside parentheses: llama.cpp's parser recurses once per level


class RequestError(LcrunError):
    """A request the loop cannot run as asked; `param` names the field (for an API's error object)."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(param, problem)
        self.param = param


class DraftSource(Protocol):
    """Where speculative decoding would take its draft tokens from (a draft model, prompt n-grams): not built yet."""

    def propose(self, tokens: Sequence[int], n: int) -> list[int]: ...


@dataclass(frozen=True)
class GenerationParams:
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None    # tokens to sample at most; None: until the model stops or the sequence is full;
    #                                  0: evaluate the prompt only (a document prefilled ahead of the question)
    stop: tuple[str, ...] = ()       # the reply ends before the first of these it would contain (OpenAI's `stop`)
    ignore_eos: bool = False         # end-of-generation tokens are text like any other
    grammar: Grammar | None = None   # what the reply must follow (a JSON schema's grammar, tool calls')
    # the sampled token's log-probability and the N most likely tokens', from the logits before sampling (the full
    # softmax of the raw logits, as llama-server reports them); None: none
    logprobs: int | None = None
    n: int = 1                       # choices from the one prompt: evaluated once, copied to a slot per choice
    # special tokens whose text the reply shows (a tool call's [TOOL_CALLS], as llama-server's preserved tokens);
    # other special tokens stay out of the text, as always
    preserved: tuple[int, ...] = ()
    draft: DraftSource | None = None  # speculative decoding: not built yet, refused by `check`

    def check(self) -> None:
        """Raise RequestError for anything out of bounds or not implemented."""
        if self.max_tokens is not None and self.max_tokens < 0:
            raise RequestError("max_tokens", f"{self.max_tokens} is negative")
        check_stops(self.stop)
        if self.grammar is not None:
            check_grammar_text(self.grammar.gbnf)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError("logprobs", f"{self.logprobs} alternatives a token; 0 to {MAX_TOP_LOGPROBS}")
        if not 1 <= self.n <= MAX_CHOICES:
            raise RequestError("n", f"{self.n} choices; 1 to {MAX_CHOICES}")
        if self.n > 1 and self.max_tokens == 0:
            raise RequestError("n", "several choices of a prompt-only request")
        if self.draft is not None:
            raise RequestError("draft", "speculative decoding is not supported yet")


# The API checks a request's grammar where it parses it (a worker thread), and the loop checks every request it is
# given (chat's too): remembered, the second check of the same text is a dictionary lookup, not a second scan of up to
# MAX_GRAMMAR_BYTES on the thread every slot shares. Only grammars that passed are remembered (a raise is not cached).
@functools.lru_cache(maxsize=16)
def check_grammar_text(gbnf: str) -> None:
    """The bounds of a grammar's text, before llama.cpp parses it: its size, and how deep its parentheses nest
    (outside literals and character classes)."""
    size = len(gbnf.encode("utf-8"))
    if size > MAX_GRAMMAR_BYTES:
        raise RequestError("grammar", f"{size:,} bytes; at most {MAX_GRAMMAR_BYTES:,}")
    if "\x00" in gbnf:
        raise RequestError("grammar", "a NUL character")
    depth = deepest = 0
    quote: str | None = None
    escaped = False
    for ch in gbnf:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"[":
            quote = "\"" if ch == "\"" else "]"
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        elif ch == "#":
            quote = "\n"  # a comment, to the end of the line
    if deepest > MAX_GRAMMAR_NESTING:
        raise RequestError("grammar", f"parentheses nest {deepest} deep; at most {MAX_GRAMMAR_NESTING}")


def check_stops(stops: Sequence[str]) -> None:
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError("stop", f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS}")
    for stop in stops:
        if not stop:
            raise RequestError("stop", "an empty stop string would end every reply at once")
        if len(stop.encode("utf-8")) > MAX_STOP_BYTES:
            raise RequestError("stop", f"a stop string of {len(stop.encode('utf-8')):,} bytes; at most "
                                       f"{MAX_STOP_BYTES}")


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class PrefillProgress:
    done: int           # prompt tokens evaluated so far (of those not reused from the cache)
    total: int


class TokenLogprob(NamedTuple):
    """A sampled token's log-probability and the most likely tokens' at its place (each as token, bytes, logprob)."""
    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


class TextChunk(NamedTuple):
    """Text of the reply (a NamedTuple: one is made per generated token, at a quarter of a frozen dataclass's cost)."""
    text: str
    n_tokens: int       # sampled tokens this text completes (a character may span tokens; a held stop candidate too)
    choice: int = 0     # which of the request's choices
    logprobs: tuple[TokenLogprob, ...] | None = None   # the tokens this text comes from, with logprobs if asked

@dataclass(frozen=True)
class Finished:
    reason: str                      # "stop" (end of generation or a stop string) | "length" | "cancelled"
    prompt_tokens: int
    reused_tokens: int               # prompt tokens not evaluated: held by the sequence, copied or restored
    completion_tokens: int           # tokens sampled (an end-of-generation one included)
    time_to_first_token_s: float     # from the request's start, its prompt's evaluation included
    prefill_tokens_per_s: float
    gen_tokens_per_s: float          # between the first and the last sampled token
    restored_tokens: int = 0         # of the reused ones, restored from a saved state (serve's disk cache)
    tokens: tuple[int, ...] = ()     # every sampled token; all but the last are in the sequence's cache
    stop: str | None = None          # the stop string that ended the reply (the text ends before it)
    choice: int = 0                  # which of the request's choices (each has its own record)


def not_started(prompt_tokens: int, choice: int = 0) -> Finished:
    """The record of a request (one choice of it) cancelled before it reached a slot."""
    return Finished("cancelled", prompt_tokens, 0, 0, 0.0, 0.0, 0.0, choice=choice)


@dataclass(frozen=True)
class Failed:
    error: Exception                 # what ended the request (an EngineError from llama_decode, a server's error)


GenerateEvent = PrefillProgress | TextChunk | Finished | Failed
