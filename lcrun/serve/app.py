"""The HTTP API: a Starlette application over a `Scheduler`.

`POST /v1/chat/completions` renders the messages with the model's chat template, `POST /v1/completions` takes a prompt
as text or token ids; both answer in one JSON body or, with `"stream": true`, as server-sent events ending in
`data: [DONE]`. `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus) and `GET /openapi.json` (the request
schemas, from the pydantic models) complete it. Every error is an OpenAI
error object. A streaming client that disconnects cancels its generation (Starlette cancels the response when the
server reports the disconnect; the scheduler frees the slot at its next step); a non-streaming one too."""
from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lcrun.chat.prompt_tokens import MarkedText, PromptTokenizer, as_content, render_marked
from lcrun.chat.template import ChatRenderer
from lcrun.engine.protocol import EngineProtocol
from lcrun.errors import LcrunError
from lcrun.generation.records import Failed, Finished, GenerateEvent, TextChunk
from lcrun.generation.records import Request as GenerationRequest

from . import openai_api as oa
from .edge import Edge, EdgePolicy, host_policy
from .metrics import CONTENT_TYPE, Metrics
from .replies import ReplyMemory
from .scheduler import Job, Scheduler, Ticket

log = logging.getLogger("lcrun.serve")

# as llama-server: no key needed to see that it is up; the API's shape is no secret either
PUBLIC_PATHS = frozenset({"/health", "/v1/models", "/openapi.json"})
ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                       "/openapi.json"})
# usage.prompt_tokens_details.cached_tokens in whole blocks, as OpenAI reports it: to the token, it would let a client
# learn another's prompt one guessed token at a time
CACHED_TOKENS_BLOCK = 128


def _loopback_edge() -> EdgePolicy:
    return EdgePolicy(host_policy("127.0.0.1", loopback=True), public_paths=PUBLIC_PATHS)


@dataclass
class ServerState:
    engine: EngineProtocol
    scheduler: Scheduler
    metrics: Metrics
    model_id: str
    template: ChatRenderer | None
    fingerprint: str = "lcrun"
    aliases: tuple[str, ...] = ()          # other names a request may give the model by
    edge: EdgePolicy = field(default_factory=_loopback_edge)   # Host, Origin, keys, body size (edge.py)
    created: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    replies: ReplyMemory = field(default_factory=ReplyMemory)
    prompt_tokens: PromptTokenizer = field(init=False)    # special tokens only where the template put them

    def __post_init__(self) -> None:
        # a small memo: long system prompts and documents that many requests share, not every client's text
        self.prompt_tokens = PromptTokenizer(self.engine.tokenize, self.engine.token_text, memo_tokens=2 << 20)

    @property
    def n_ctx_slot(self) -> int:
        return self.scheduler.n_ctx_slot


def create_app(state: ServerState) -> ASGIApp:
    routes = [
        Route("/health", _endpoint(state, _health), methods=["GET"]),
        Route("/metrics", _endpoint(state, _metrics), methods=["GET"]),
        Route("/v1/models", _endpoint(state, _models), methods=["GET"]),
        Route("/openapi.json", _endpoint(state, _openapi), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(state, _chat_completions), methods=["POST"]),
        Route("/v1/completions", _endpoint(state, _completions), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = (f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405
                   else str(exc.detail))
        return _error(oa.APIError(exc.status_code, message, type=kind))

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return _Counted(Edge(app, state.edge), state.metrics)


class _Counted:
    """Counts every answer by endpoint and status, the edge's refusals too."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def _error(error: oa.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


Handler = Callable[[ServerState, Request], Awaitable[Response]]


def _endpoint(state: ServerState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(state, request)
        except oa.APIError as error:
            return _error(_public(error))
        except Exception:  # noqa: BLE001 - never a traceback to a client, never a dead server
            return _error(_internal(f"on {request.url.path}"))

    return endpoint


def _internal(where: str, detail: str | None = None) -> oa.APIError:
    """A 500 as the client sees it: a generic message and an id; what went wrong (exception, paths) goes to the
    server's log under that id."""
    ident = uuid.uuid4().hex[:12]
    if detail is None:
        log.exception("internal error %s %s", ident, where)
    else:
        log.error("internal error %s %s: %s", ident, where, detail)
    return oa.APIError(500, f"internal error (id {ident}); the server's log has the details", type="server_error",
                       code="internal_error")


def _public(error: oa.APIError) -> oa.APIError:
    """A server error from the scheduler says what failed in its message (llama.cpp's words, a path): logged, and
    answered as `_internal`. Refusals (4xx) and 503s (queue full, shutting down) are meant for the client."""
    if error.status >= 500 and error.status != 503:
        return _internal("in the scheduler", error.message)
    return error


# -- the small endpoints -------------------------------------------------------------------------------------------
async def _health(state: ServerState, request: Request) -> Response:
    return JSONResponse({"status": "ok", "slots_idle": len(state.scheduler.slots) - state.scheduler.busy_slots,
                         "slots_processing": state.scheduler.busy_slots})


async def _metrics(state: ServerState, request: Request) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def _models(state: ServerState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "lcrun", "meta": state.meta}
    ]})


async def _openapi(state: ServerState, request: Request) -> Response:
    from lcrun import __version__

    from .openapi import openapi_document

    return JSONResponse(openapi_document(__version__))


# -- completions -----------------------------------------------------------------------------------------------------
# A request takes its place in the admission bound first (`reserve`: 503 when every slot is busy and the queue is
# full), so a full server refuses it before paying for anything. Then parsing, validating, rendering and tokenizing
# its prompt — milliseconds to seconds — run on a worker thread, never on the event loop that every other client's
# stream is written from. The ticket goes with the job and is released when its generation ends.
async def _chat_completions(state: ServerState, request: Request) -> Response:
    with state.scheduler.reserve() as ticket:
        return await _chat(state, request, ticket)


async def _completions(state: ServerState, request: Request) -> Response:
    with state.scheduler.reserve() as ticket:
        return await _text(state, request, ticket)


def _partition(request: Request) -> str | None:
    """Whose cached prompts this request may share: its API key's id (edge.py), or everyone's without keys."""
    return request.scope.get("state", {}).get("api_key_id")


async def _chat(state: ServerState, request: Request, ticket: Ticket) -> Response:
    body = await request.body()
    partition = _partition(request)

    def prepare() -> tuple[oa.ChatCompletionRequest, str, list[int], str]:
        req: oa.ChatCompletionRequest = oa.validate(oa.ChatCompletionRequest, oa.parse_json_body(body))
        model = _model(state, req.model)
        if state.template is None:
            raise oa.bad_request("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = render_marked(state.template, req.template_messages())
        except LcrunError as exc:  # a Jinja template that refuses them, or llama.cpp refusing a built-in format
            raise oa.bad_request(f"the model's chat template refused the messages: {exc}",
                                 param="messages") from None
        return req, model, _tokenize_chat(state, text, partition), text

    req, model, tokens, text = await to_thread.run_sync(prepare)
    return await _run(state, request, ticket, req, model, "chat", tokens, "messages", rendered=text)


async def _text(state: ServerState, request: Request, ticket: Ticket) -> Response:
    body = await request.body()

    def prepare() -> tuple[oa.CompletionRequest, str, list[int]]:
        req: oa.CompletionRequest = oa.validate(oa.CompletionRequest, oa.parse_json_body(body))
        model = _model(state, req.model)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            # the client writes the whole prompt, special tokens included (as llama-server's /completion): parsed
            return req, model, state.engine.tokenize(prompt, special=True, add_bos=True)
        n_vocab = getattr(state.engine, "n_vocab", None)
        if n_vocab is not None and any(not 0 <= t < n_vocab for t in prompt):
            raise oa.bad_request(f"prompt: token ids must be in [0, {n_vocab})", param="prompt")
        return req, model, list(prompt)

    req, model, tokens = await to_thread.run_sync(prepare)
    return await _run(state, request, ticket, req, model, "text", tokens, "prompt")


def _model(state: ServerState, name: str | None) -> str:
    if name is None or name == state.model_id or name in state.aliases:
        return state.model_id
    raise oa.APIError(400, f"The model `{name}` does not exist; this server runs `{state.model_id}` "
                           "(see /v1/models)", param="model", code="model_not_found")


def _tokenize_chat(state: ServerState, text: MarkedText, partition: str | None) -> list[int]:
    tokenize = lambda t: state.prompt_tokens(MarkedText(t, text.contents))  # noqa: E731
    # a rendered chat ends with its replies: their sampled tokens, as the KV cache holds them
    return state.replies.tokenize(text, tokenize, partition)


async def _run(state: ServerState, request: Request, ticket: Ticket, req: Any, model: str, kind: str,
               tokens: list[int], param: str, rendered: str | None = None) -> Response:
    if not tokens:
        raise oa.bad_request(f"{param}: empty (no tokens)", param=param)
    if len(tokens) >= state.n_ctx_slot:
        raise oa.context_length_exceeded(len(tokens), state.n_ctx_slot, param)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerateEvent] = asyncio.Queue()

    def sink(event: GenerateEvent) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    partition = _partition(request)
    job = Job(GenerationRequest(tokens, req.generation_params(seed=random.getrandbits(32))), sink,
              partition=partition, ticket=ticket)
    state.scheduler.submit(job)
    reply = oa.Reply(kind, model, state.fingerprint)  # type: ignore[arg-type]

    def finished(text: str, done: Finished) -> None:
        if rendered is not None and done.tokens and done.stop is None:  # the text is exactly its tokens'
            end = state.engine.token_text(done.tokens[-1]) if done.reason == "stop" else ""
            state.replies.remember(rendered + as_content(text) + end, tokens + list(done.tokens), partition)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(job, events, reply, include_usage, finished),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collector = asyncio.ensure_future(_collect(events))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
        job.cancel()
    if not collector.done() or collector.cancelled():
        return Response(status_code=499)  # the client is gone; nobody reads this
    text, done = collector.result()
    finished(text, done)
    return JSONResponse(reply.complete(text, done.reason, _usage(done)))


def _usage(done: Finished) -> oa.Usage:
    cached = done.reused_tokens // CACHED_TOKENS_BLOCK * CACHED_TOKENS_BLOCK
    return oa.Usage(done.prompt_tokens, done.completion_tokens, cached)


async def _collect(events: asyncio.Queue[GenerateEvent]) -> tuple[str, Finished]:
    parts: list[str] = []
    while True:
        event = await events.get()
        if isinstance(event, TextChunk):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event
        elif isinstance(event, Failed):
            raise event.error  # made public by `_endpoint`


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _stream(job: Job, events: asyncio.Queue[GenerateEvent], reply: oa.Reply, include_usage: bool,
                  finished: Callable[[str, Finished], None]) -> AsyncIterator[bytes]:
    sent: list[str] = []
    try:
        if reply.kind == "chat":
            yield oa.sse(reply.chunk("", first=True))
        while True:
            batch = [await events.get()]
            while not events.empty():  # the loop fell behind the tokens: one chunk for what is there
                batch.append(events.get_nowait())
            text = "".join(e.text for e in batch if isinstance(e, TextChunk))
            if text:
                sent.append(text)
                yield oa.sse(reply.chunk(text))
            end = next((e for e in batch if isinstance(e, (Finished, Failed))), None)
            if isinstance(end, Finished):
                finished("".join(sent), end)
                yield oa.sse(reply.chunk(None, end.reason))
                if include_usage:
                    yield oa.sse(reply.usage_chunk(_usage(end)))
                yield oa.sse("[DONE]")
                return
            if isinstance(end, Failed):
                yield oa.sse(_public(end.error).body())
                return
    finally:
        job.cancel()  # a no-op once it is done; a client that went away ends its generation here
