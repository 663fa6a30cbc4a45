"""A slot: one sequence of the engine and the request it is running — what the loop needs between two steps (the
prompt's chunks still to decode, the next token to feed, the counts and times of the finish record) — and the one
place where a sampled token becomes text: end of generation, incremental UTF-8 (bytes of a character split across
tokens are held until it is whole), stop strings, the length limit; the sampled tokens' log-probabilities go out
with the text they make. A request with several choices runs on a slot per choice: the first evaluates the prompt,
the others (`siblings`) wait and then start from a copy of it."""
from __future__ import annotations

import codecs
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import Enum

from lcrun.engine.protocol import EngineProtocol

from .records import Finished, GenerateEvent, Request, TextChunk, TokenLogprob
from .stops import StopMatcher

Sink = Callable[[GenerateEvent], None]


class Phase(Enum):
    IDLE = "idle"
    WAITING = "waiting"      # assigned a request, not started (e.g. a saved state is being read for it)
    PREFILL = "prefill"
    GENERATE = "generate"


def _rate(n: int, seconds: float) -> float:
    return n / seconds if n > 0 and seconds > 0 else 0.0


class Slot:
    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.phase = Phase.IDLE
        self.request: Request | None = None
        self.sink: Sink = _nowhere
        self.cancel: threading.Event | None = None
        self.chunks: deque[list[int]] = deque()
        self.admitted = 0            # start order: prompts are prefilled first come, first served
        self.reused = 0
        self.restored = 0
        self.prefill_total = 0
        self.prefill_done = 0
        self.limit = 0               # tokens it may sample
        self.generated = 0
        self.sampled: list[int] = []
        self.next_token = -1         # sampled, to be decoded in the next step
        self.unsent = 0              # sampled tokens whose text is not out yet
        self.started_at = 0.0
        self.prefilled_at = 0.0
        self.first_token_at: float | None = None
        self.last_used = 0.0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops: StopMatcher | None = None
        self.ignore_eos = False
        self.choice = 0
        self.siblings: list[Slot] = []   # the slots of the request's other choices, started once its prompt is in
        self.top_logprobs: int | None = None
        self.preserved: frozenset[int] = frozenset()
        self.logprobs: list[TokenLogprob] = []   # sampled tokens whose text is not out yet

    def assign(self, request: Request, sink: Sink, cancel: threading.Event | None, choice: int = 0) -> None:
        self.request, self.sink, self.cancel = request, sink, cancel
        self.phase = Phase.WAITING
        self.choice = choice
        self.siblings = []
        self.started_at = time.perf_counter()

    def begin(self, reused: int, restored: int, chunks: list[list[int]], limit: int) -> None:
        """The prompt is planned: `chunks` to evaluate after the `reused` tokens the sequence holds."""
        assert self.request is not None
        stop = self.request.params.stop
        self.chunks = deque(chunks)
        self.reused, self.restored = reused, min(restored, reused)
        self.prefill_total, self.prefill_done = sum(map(len, chunks)), 0
        self.limit, self.generated, self.sampled, self.unsent = limit, 0, [], 0
        self.first_token_at = None
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = StopMatcher(stop) if stop else None
        self.ignore_eos = self.request.params.ignore_eos
        self.top_logprobs = self.request.params.logprobs
        self.preserved = frozenset(self.request.params.preserved)
        self.logprobs = []
        self.phase = Phase.PREFILL

    # -- tokens out: the one place --------------------------------------------------------------------------------
    def on_token(self, token: int, engine: EngineProtocol) -> bool:
        """Take a sampled token; False once the reply is finished (the finish record is sent)."""
        self.generated += 1
        self.sampled.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if not self.ignore_eos and engine.is_eog(token):
            if self.top_logprobs is not None:
                self.logprobs.pop()  # the end of the reply is no text
            self._flush()
            self.finish("stop")
            return False
        self.unsent += 1
        text = self.decoder.decode(self.piece(token, engine))
        if text:
            stops = self.stops
            if stops is None:
                self._send(text)
            else:
                text, stop = stops.feed(text)
                if stop is not None and self.top_logprobs is not None:
                    self.logprobs.pop()  # the token that completed the stop string
                if text:
                    self._send(text)
                if stop is not None:
                    self.finish("stop", stop)
                    return False
        if self.generated >= self.limit:
            self._flush()
            self.finish("length")
            return False
        self.next_token = token
        return True

    def piece(self, token: int, engine: EngineProtocol) -> bytes:
        """The token's bytes as the reply's text has them."""
        if self.preserved and token in self.preserved:
            return engine.token_text(token).encode("utf-8")
        return engine.token_bytes(token)

    def _send(self, text: str) -> None:
        if self.top_logprobs is None:
            self.sink(TextChunk(text, self.unsent, self.choice))
        else:
            self.sink(TextChunk(text, self.unsent, self.choice, tuple(self.logprobs)))
            self.logprobs = []
        self.unsent = 0

    def _flush(self) -> None:
        """Send what is held at the end: an incomplete character (as U+FFFD) and a stop string's unfinished start."""
        text = self.decoder.decode(b"", final=True)
        if self.stops is not None:
            text, stop = self.stops.feed(text)
            if stop is None:
                text += self.stops.flush()
        if text:
            self._send(text)

    def finish(self, reason: str, stop: str | None = None) -> Finished:
        """Build the finish record, free the slot, send the record."""
        assert self.request is not None
        now = time.perf_counter()
        first = self.first_token_at
        done = Finished(
            reason=reason, prompt_tokens=len(self.request.prompt), reused_tokens=self.reused,
            completion_tokens=self.generated,
            time_to_first_token_s=(first if first is not None else now) - self.started_at,
            prefill_tokens_per_s=_rate(self.prefill_done, (self.prefilled_at or now) - self.started_at),
            gen_tokens_per_s=_rate(self.generated - 1, now - first) if first is not None else 0.0,
            restored_tokens=self.restored, tokens=tuple(self.sampled), stop=stop, choice=self.choice,
        )
        sink = self.sink
        self.release()
        sink(done)
        return done

    def release(self) -> None:
        self.phase, self.request, self.sink, self.cancel = Phase.IDLE, None, _nowhere, None
        self.chunks = deque()
        self.siblings = []
        self.logprobs = []
        self.last_used = time.perf_counter()


def _nowhere(event: GenerateEvent) -> None:
    pass
