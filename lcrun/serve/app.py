"""The HTTP API: a Starlette application over a `Scheduler`.

`POST /v1/chat/completions` renders the messages with the model's chat template, `POST /v1/completions` takes a prompt
as text or token ids; both answer in one JSON body or, with `"stream": true`, as server-sent events ending in
`data: [DONE]`. `GET /v1/models`, `GET /health` and `GET /metrics` (Prometheus) complete it. Every error is an OpenAI
error object. A streaming client that disconnects cancels its generation (Starlette cancels the response when the
server reports the disconnect; the scheduler frees the slot at its next step); a non-streaming one too."""
from __future__ import annotations

import asyncio
import hmac
import logging
import random
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

from lcrun.chat.template import ChatRenderer
from lcrun.engine.protocol import EngineProtocol
from lcrun.errors import LcrunError
from lcrun.generation.records import Failed, Finished, GenerateEvent, Request, TextChunk

from . import openai_api as oa
from .metrics import CONTENT_TYPE, Metrics
from .replies import ReplyMemory
from .scheduler import Job, Scheduler

log = logging.getLogger("lcrun.serve")

PUBLIC_PATHS = frozenset({"/health", "/v1/models"})   # as llama-server: no key needed to see that it is up
ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})
# tokenizing a long prompt takes a while: off the event loop above this many characters
_TOKENIZE_IN_THREAD = 20_000


@dataclass
class ServerState:
    engine: EngineProtocol
    scheduler: Scheduler
    metrics: Metrics
    model_id: str
    template: ChatRenderer | None
    fingerprint: str = "lcrun"
    aliases: tuple[str, ...] = ()          # other names a request may give the model by
    api_key: str | None = None
    created: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    replies: ReplyMemory = field(default_factory=ReplyMemory)

    @property
    def n_ctx_slot(self) -> int:
        return self.scheduler.n_ctx_slot


def create_app(state: ServerState) -> ASGIApp:
    routes = [
        Route("/health", _endpoint(state, _health), methods=["GET"]),
        Route("/metrics", _endpoint(state, _metrics), methods=["GET"]),
        Route("/v1/models", _endpoint(state, _models), methods=["GET"]),
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
    return _Guard(app, state)


class _Guard:
    """Counts every answer by endpoint and status, and asks for the API key (Authorization: Bearer, or X-Api-Key)
    when one is set."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        metrics = self.state.metrics

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics.request(endpoint, message["status"])
            await send(message)

        key = self.state.api_key
        if key and path not in PUBLIC_PATHS and not _authorized(scope, key):
            error = oa.APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer KEY`",
                                type="invalid_request_error", code="invalid_api_key")
            await _error(error)(scope, receive, counted)
            return
        await self.app(scope, receive, counted)


def _authorized(scope: Scope, key: str) -> bool:
    headers = dict(scope["headers"])
    given = headers.get(b"x-api-key", b"").decode("latin-1")
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


def _error(error: oa.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


Handler = Callable[[ServerState, Request], Awaitable[Response]]


def _endpoint(state: ServerState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(state, request)
        except oa.APIError as error:
            return _error(error)
        except Exception as exc:  # noqa: BLE001 - never a traceback to a client, never a dead server
            log.exception("internal error on %s", request.url.path)
            return _error(oa.APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    return endpoint


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


# -- completions -----------------------------------------------------------------------------------------------------
async def _chat_completions(state: ServerState, request: Request) -> Response:
    req: oa.ChatCompletionRequest = oa.validate(oa.ChatCompletionRequest, oa.parse_json_body(await request.body()))
    model = _model(state, req.model)
    if state.template is None:
        raise oa.bad_request("this model has no chat template; use /v1/completions", param="messages")
    try:
        text = state.template.render(req.template_messages())
    except LcrunError as exc:  # a Jinja template that refuses them, or llama.cpp refusing a built-in format
        raise oa.bad_request(f"the model's chat template refused the messages: {exc}", param="messages") from None
    tokens = await _tokenize(state, text, add_bos=False)
    return await _run(state, request, req, model, "chat", tokens, "messages", rendered=text)


async def _completions(state: ServerState, request: Request) -> Response:
    req: oa.CompletionRequest = oa.validate(oa.CompletionRequest, oa.parse_json_body(await request.body()))
    model = _model(state, req.model)
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        tokens = await _tokenize(state, prompt, add_bos=True)
    else:
        n_vocab = getattr(state.engine, "n_vocab", None)
        if n_vocab is not None and any(not 0 <= t < n_vocab for t in prompt):
            raise oa.bad_request(f"prompt: token ids must be in [0, {n_vocab})", param="prompt")
        tokens = list(prompt)
    return await _run(state, request, req, model, "text", tokens, "prompt")


def _model(state: ServerState, name: str | None) -> str:
    if name is None or name == state.model_id or name in state.aliases:
        return state.model_id
    raise oa.APIError(400, f"The model `{name}` does not exist; this server runs `{state.model_id}` "
                           "(see /v1/models)", param="model", code="model_not_found")


async def _tokenize(state: ServerState, text: str, *, add_bos: bool) -> list[int]:
    def tokenize() -> list[int]:
        plain = lambda t: state.engine.tokenize(t, special=True, add_bos=add_bos)  # noqa: E731
        # a rendered chat ends with its replies: their sampled tokens, as the KV cache holds them
        return plain(text) if add_bos else state.replies.tokenize(text, plain)

    if len(text) > _TOKENIZE_IN_THREAD:
        return await to_thread.run_sync(tokenize)
    return tokenize()


async def _run(state: ServerState, request: Request, req: Any, model: str, kind: str, tokens: list[int],
               param: str, rendered: str | None = None) -> Response:
    if not tokens:
        raise oa.bad_request(f"{param}: empty (no tokens)", param=param)
    if len(tokens) >= state.n_ctx_slot:
        raise oa.context_length_exceeded(len(tokens), state.n_ctx_slot, param)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerateEvent] = asyncio.Queue()

    def sink(event: GenerateEvent) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(Request(tokens, req.generation_params(seed=random.getrandbits(32))), sink)
    state.scheduler.submit(job)
    reply = oa.Reply(kind, model, state.fingerprint)  # type: ignore[arg-type]

    def finished(text: str, done: Finished) -> None:
        if rendered is not None and done.tokens and done.stop is None:  # the text is exactly its tokens'
            end = state.engine.token_text(done.tokens[-1]) if done.reason == "stop" else ""
            state.replies.remember(rendered + text + end, tokens + list(done.tokens))

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
    return oa.Usage(done.prompt_tokens, done.completion_tokens, done.reused_tokens)


async def _collect(events: asyncio.Queue[GenerateEvent]) -> tuple[str, Finished]:
    parts: list[str] = []
    while True:
        event = await events.get()
        if isinstance(event, TextChunk):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event
        elif isinstance(event, Failed):
            raise event.error


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
                error = end.error if isinstance(end.error, oa.APIError) else oa.APIError(500, str(end.error))
                yield oa.sse(error.body())
                return
    finally:
        job.cancel()  # a no-op once it is done; a client that went away ends its generation here
