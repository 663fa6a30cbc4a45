"""The one request record and the one finish record of every generation — chat, niah, bench and serve alike — and
the events a request streams: `PrefillProgress` while its prompt is evaluated, `TextChunk`s of the reply, then one
`Finished` (or `Failed`, when llama.cpp refused a decode).

A `Request` is prompt tokens plus `GenerationParams`: the sampler settings (seed included), `max_tokens` (its one
home), stop strings, `ignore_eos`, and the fields later features hang on — a grammar, log-probabilities, several
choices, a draft source for speculative decoding. Those exist so that they arrive through the same loop; until each
is implemented, `check` refuses it by name instead of ignoring it."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from lcrun.engine.protocol import Sampling
from lcrun.errors import LcrunError

MAX_STOP_STRINGS = 16     # stop strings per request
MAX_STOP_BYTES = 256      # UTF-8 bytes per stop string: the matcher holds back at most this much text


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
    # -- what later features hang on (issue 19); refused by `check` until implemented
    grammar: str | None = None       # a GBNF grammar constraining the reply (JSON schema, tool calls)
    logprobs: int | None = None      # top-N log-probabilities of each sampled token, from the logits before sampling
    n: int = 1                       # choices, sharing the prompt's KV cells by sequence copy
    draft: DraftSource | None = None

    def check(self) -> None:
        """Raise RequestError for anything out of bounds or not implemented."""
        if self.max_tokens is not None and self.max_tokens < 0:
            raise RequestError("max_tokens", f"{self.max_tokens} is negative")
        check_stops(self.stop)
        if self.grammar is not None:
            raise RequestError("grammar", "constrained output (grammars, JSON schemas) is not supported yet")
        if self.logprobs:
            raise RequestError("logprobs", "log-probabilities are not supported yet")
        if self.n != 1:
            raise RequestError("n", "only one choice per request is supported")
        if self.draft is not None:
            raise RequestError("draft", "speculative decoding is not supported yet")


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


class TextChunk(NamedTuple):
    """Text of the reply (a NamedTuple: one is made per generated token, at a quarter of a frozen dataclass's cost)."""
    text: str
    n_tokens: int       # sampled tokens this text completes (a character may span tokens; a held stop candidate too)


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


def not_started(prompt_tokens: int) -> Finished:
    """The record of a request cancelled before it reached a slot."""
    return Finished("cancelled", prompt_tokens, 0, 0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Failed:
    error: Exception                 # what ended the request (an EngineError from llama_decode, a server's error)


GenerateEvent = PrefillProgress | TextChunk | Finished | Failed
