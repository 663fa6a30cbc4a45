"""One request on one slot of the decode loop, driven in the calling thread: what `chat`, `niah` and `bench` use
(serve's scheduler drives the same loop with several slots from its own thread).

`generate` is a generator: each `next()` runs loop steps until the request has events to hand back, so the caller
renders a token while nothing else happens, and a `cancel` event set meanwhile (Ctrl-C) ends the request at the
next step — between two tokens, or two prefill chunks — leaving the cache consistent. A thread of its own stepping the
loop, the events crossing a queue, was measured too (benchmarks/bench_drive.py, docs/performance.md): on the loaded
shared VM it was faster, but because a freshly started thread runs llama_decode faster there than a long-running one
(llama-cpp-python's `Llama` alike), not because of the hand-over; and it would outlive a caller that stops reading and
make Ctrl-C's timing depend on scheduling. So the calling thread, as `Llama` generates in its caller."""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence

from lcrun.engine.protocol import EngineProtocol

from .loop import DecodeLoop
from .records import Failed, Finished, GenerateEvent, GenerationParams, PrefillProgress, Request


def generate(engine: EngineProtocol, request: Request, *, seq: int = 0, cancel: threading.Event | None = None,
             prefill_chunk: int = 512, pad_short_batches: bool = True) -> Iterator[GenerateEvent]:
    """Stream one request on sequence `seq`: `PrefillProgress` per chunk of the prompt not reused from the cache,
    `TextChunk`s, then `Finished`. A decode llama.cpp refuses raises its EngineError."""
    loop = DecodeLoop(engine, prefill_chunk=prefill_chunk, pad_short_batches=pad_short_batches, seqs=(seq,))
    events: deque[GenerateEvent] = deque()
    loop.submit(loop.slots[0], request, events.append, cancel=cancel)
    while True:
        while events:
            event = events.popleft()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Finished):
                return
        loop.step()


def prefill(engine: EngineProtocol, tokens: Sequence[int], *, seq: int = 0, cancel: threading.Event | None = None,
            chunk: int = 512) -> Iterator[PrefillProgress | Finished]:
    """Bring a sequence's cache to `tokens` without sampling (a document as soon as it is added): a request with
    max_tokens 0. Cancelling leaves the part already evaluated cached."""
    for event in generate(engine, Request(tokens, GenerationParams(max_tokens=0)), seq=seq, cancel=cancel,
                          prefill_chunk=chunk):
        assert isinstance(event, (PrefillProgress, Finished))
        yield event
