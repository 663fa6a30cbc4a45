"""A request's run through the scheduler, whatever API it came in by: `Run` submits the job and reads the decode
loop's events back as `Delta`s, one per choice and step — the content to send (a tool call's text held back, and
parsed into calls when its choice ends: lcrun.tool_calls), the log-probabilities of the tokens it came from, the
calls, the finish — which openai_reply.py and ollama_api.py put into their own shapes, streamed or whole."""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

from lcrun.generation.records import Failed, Finished, GenerateEvent, GenerationParams, TextChunk, TokenLogprob
from lcrun.generation.records import Request as GenerationRequest
from lcrun.tool_calls.formats import Family, parse_reply
from lcrun.tool_calls.specs import ToolCall, ToolSpec
from lcrun.tool_calls.stream import CallSplitter

from .jobs import Job, Ticket
from .openai_api import APIError

if TYPE_CHECKING:
    from starlette.responses import Response

    from .scheduler import Scheduler
    from .state import ServerState

T = TypeVar("T")
log = logging.getLogger("lcrun.serve")
# usage.prompt_tokens_details.cached_tokens in whole blocks, as OpenAI reports it: to the token, it would let a client
# learn another's prompt one guessed token at a time
CACHED_TOKENS_BLOCK = 128


@dataclass(frozen=True)
class ToolParsing:
    """How a reply's tool calls are spelled (the template's family) and which functions they may call."""
    family: Family
    specs: list[ToolSpec]


@dataclass(frozen=True)
class Delta:
    choice: int
    content: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    calls: tuple[ToolCall, ...] = ()
    finished: Finished | None = None
    finish_reason: str | None = None


@dataclass
class Choice:
    """One choice, whole: what a non-streamed answer is made of."""
    index: int
    content: str | None = None
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None
    finish_reason: str = "stop"
    text: str = ""                       # the reply as generated (calls included)


def finish_reason(done: Finished, calls: object) -> str:
    return "tool_calls" if calls and done.reason == "stop" else done.reason


class Run:
    """One request submitted to the scheduler (from the event loop's thread), holding the `ticket` it was admitted
    with, its cached prompts shared only within its `partition` (its API key)."""

    def __init__(self, scheduler: Scheduler, tokens: list[int], params: GenerationParams,
                 tools: ToolParsing | None = None, *, ticket: Ticket | None = None,
                 partition: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[GenerateEvent] = asyncio.Queue()

        def sink(event: GenerateEvent) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.n = params.n
        self.tools = tools
        self.prompt_tokens = len(tokens)
        self.job = Job(GenerationRequest(tokens, params), sink, partition=partition, ticket=ticket)
        self._raw: list[list[str]] = [[] for _ in range(self.n)]
        self._splitters = [CallSplitter(tools.family) if tools else None for _ in range(self.n)]
        self.finished: dict[int, Finished] = {}
        scheduler.submit(self.job)

    def cancel(self) -> None:
        self.job.cancel()

    def text(self, choice: int) -> str:
        """A choice's reply as generated so far (tool-call text included)."""
        return "".join(self._raw[choice])

    @property
    def completion_tokens(self) -> int:
        return sum(done.completion_tokens for done in self.finished.values())

    @property
    def cached_tokens(self) -> int:
        reused = max((done.reused_tokens for done in self.finished.values()), default=0)
        return reused // CACHED_TOKENS_BLOCK * CACHED_TOKENS_BLOCK

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """What each step brought, a Delta per choice that has news (what came while the client was being written
        to goes out together); ends when every choice has finished. A failed request raises its error."""
        while len(self.finished) < self.n:
            batch = [await self.events.get()]
            while not self.events.empty():
                batch.append(self.events.get_nowait())
            merged: dict[int, Delta] = {}
            for event in batch:
                delta = self._delta(event)
                if delta is None:
                    continue
                before = merged.get(delta.choice)
                if before is not None and before.finished is None:
                    delta = Delta(delta.choice, before.content + delta.content, before.logprobs + delta.logprobs,
                                  delta.calls, delta.finished, delta.finish_reason)
                merged[delta.choice] = delta
            if merged:
                yield [merged[i] for i in sorted(merged)]

    def _delta(self, event: GenerateEvent) -> Delta | None:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, TextChunk):
            self._raw[event.choice].append(event.text)
            splitter = self._splitters[event.choice]
            content = event.text if splitter is None else splitter.feed(event.text)
            return Delta(event.choice, content, event.logprobs or () if content else ())
        if isinstance(event, Finished):
            self.finished[event.choice] = event
            splitter = self._splitters[event.choice]
            if splitter is None or self.tools is None:
                return Delta(event.choice, finished=event, finish_reason=event.reason)
            content = splitter.finish()
            calls: list[ToolCall] = []
            if splitter.in_call:
                parsed, calls = parse_reply(self.tools.family, self.text(event.choice), self.tools.specs)
                if self.tools.family.always_json:
                    content = parsed or ""
                elif not calls:
                    content = splitter.call_text
            return Delta(event.choice, content, (), tuple(calls), event, finish_reason(event, calls))
        return None

    async def collect(self) -> list[Choice]:
        """Every choice, whole."""
        choices = [Choice(i) for i in range(self.n)]
        for deltas in [d async for d in self.deltas()]:
            for delta in deltas:
                choice = choices[delta.choice]
                choice.logprobs += delta.logprobs
                if delta.finished is not None:
                    choice.finished, choice.finish_reason = delta.finished, delta.finish_reason or "stop"
        for choice in choices:
            choice.text = self.text(choice.index)
            if self.tools is None:
                choice.content = choice.text
            else:
                choice.content, choice.calls = parse_reply(self.tools.family, choice.text, self.tools.specs)
                assert choice.finished is not None
                choice.finish_reason = finish_reason(choice.finished, choice.calls)
        return choices


async def unless_disconnected(request: Request, work: Awaitable[T], run: Run) -> T | None:
    """`work`'s result, or None when the client went away first (its generation is cancelled then)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        run.cancel()
    if not task.done() or task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def admitted(handler: Callable[[ServerState, Request, Ticket], Awaitable[Response]]
             ) -> Callable[[ServerState, Request], Awaitable[Response]]:
    """A generation route that first takes its place in the admission bound (`reserve`: 503 when every slot is busy
    and the queue is full), so a full server refuses a request before paying for anything; the ticket goes with the
    job and is released when its generation ends. Every generation route of both APIs is one."""
    async def route(state: ServerState, request: Request) -> Response:
        with state.scheduler.reserve() as ticket:
            return await handler(state, request, ticket)

    route.__name__ = handler.__name__
    return route


def internal_error(where: str, detail: str | None = None) -> APIError:
    """A 500 as the client sees it: a generic message and an id; what went wrong (exception, paths) goes to the
    server's log under that id."""
    ident = uuid.uuid4().hex[:12]
    if detail is None:
        log.exception("internal error %s %s", ident, where)
    else:
        log.error("internal error %s %s: %s", ident, where, detail)
    return APIError(500, f"internal error (id {ident}); the server's log has the details", type="server_error",
                    code="internal_error")


def public_error(error: APIError) -> APIError:
    """A server error from the scheduler says what failed in its message (llama.cpp's words, a path): logged, and
    answered as `internal_error`. Refusals (4xx) and 503s (queue full, shutting down) are meant for the client."""
    if error.status >= 500 and error.status != 503:
        return internal_error("in the scheduler", error.message)
    return error
