"""The HTTP API: a Starlette application over a `Scheduler`.

`POST /v1/chat/completions` renders the messages with the model's chat template, `POST /v1/completions` takes a prompt
as text or token ids; both answer in one JSON body or, with `"stream": true`, as server-sent events ending in
`data: [DONE]`. `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus) and `GET /openapi.json` (the request
schemas, from the pydantic models) complete it. Every error is an OpenAI
error object. A streaming client that disconnects cancels its generation (Starlette cancels the response when the
server reports the disconnect; the scheduler frees the slot at its next step); a non-streaming one too."""
from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send


from . import openai_api as oa
from .edge import Edge
from .metrics import CONTENT_TYPE, Metrics
from .ollama_routes import OLLAMA_ENDPOINTS, ollama_routes
from .openai_reply import Reply, Usage, sse
from .jobs import Ticket
from .prompting import _tokenize_chat, chat_prompt, check_prompt, partition_of, remember_reply
from .respond import Run, admitted, internal_error, public_error, unless_disconnected
from .state import PUBLIC_PATHS, ServerState
from .structured import JSON_OBJECT, OutputPlan, output_plan

__all__ = ["PUBLIC_PATHS", "ServerState", "create_app"]

log = logging.getLogger("lcrun.serve")

ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                       "/openapi.json"}) | OLLAMA_ENDPOINTS


def create_app(state: ServerState) -> ASGIApp:
    routes = [
        Route("/health", _endpoint(state, _health), methods=["GET"]),
        Route("/metrics", _endpoint(state, _metrics), methods=["GET"]),
        Route("/v1/models", _endpoint(state, _models), methods=["GET"]),
        Route("/openapi.json", _endpoint(state, _openapi), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(state, admitted(_chat)), methods=["POST"]),
        Route("/v1/completions", _endpoint(state, admitted(_text)), methods=["POST"]),
        *ollama_routes(state, _endpoint),
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


def _error(error: oa.APIError, body: Callable[[oa.APIError], dict[str, Any]] = oa.APIError.body) -> JSONResponse:
    return JSONResponse(body(error), status_code=error.status, headers=error.headers)


Handler = Callable[[ServerState, Request], Awaitable[Response]]


def _endpoint(state: ServerState, handler: Handler, body: Callable[[oa.APIError], dict[str, Any]] = oa.APIError.body
              ) -> Callable[[Request], Awaitable[Response]]:
    """`handler` with every error answered in its API's shape (`body`: OpenAI's by default, Ollama's for /api)."""
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(state, request)
        except oa.APIError as error:
            return _error(public_error(error), body)
        except Exception:  # noqa: BLE001 - never a traceback to a client, never a dead server
            return _error(internal_error(f"on {request.url.path}"), body)

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


async def _openapi(state: ServerState, request: Request) -> Response:
    from lcrun import __version__

    from .openapi import openapi_document

    return JSONResponse(openapi_document(__version__))


# -- completions -----------------------------------------------------------------------------------------------------
# A request takes its place in the admission bound first (respond.admitted), so a full server refuses it before
# paying for anything. Then parsing, validating, rendering and tokenizing its prompt (and compiling its grammar) —
# milliseconds to seconds — run on a worker thread, never on the event loop that every other client's stream is
# written from. Ollama's routes (ollama_routes.py) do the same.
async def _chat(state: ServerState, request: Request, ticket: Ticket) -> Response:
    body = await request.body()
    partition = partition_of(request)

    def prepare() -> tuple[oa.ChatCompletionRequest, str, list[int], str, OutputPlan]:
        req: oa.ChatCompletionRequest = oa.validate(oa.ChatCompletionRequest, oa.parse_json_body(body))
        model = _model(state, req.model)
        if state.template is None:
            raise oa.bad_request("this model has no chat template; use /v1/completions", param="messages")
        plan = output_plan(state.engine, state.template_source, schema=_schema_of(req), grammar=req.grammar,
                           tools=[t.model_dump() for t in req.tools or []], choice=_choice_of(req),
                           parallel=req.parallel_tool_calls)
        text = chat_prompt(state, req.template_messages(), plan)
        return req, model, _tokenize_chat(state, text, partition), text, plan

    req, model, tokens, text, plan = await to_thread.run_sync(prepare)
    return await _run(state, request, ticket, req, model, "chat", tokens, "messages", plan, rendered=text)


async def _text(state: ServerState, request: Request, ticket: Ticket) -> Response:
    body = await request.body()

    def prepare() -> tuple[oa.CompletionRequest, str, list[int], OutputPlan]:
        req: oa.CompletionRequest = oa.validate(oa.CompletionRequest, oa.parse_json_body(body))
        model = _model(state, req.model)
        plan = output_plan(state.engine, None, schema=_schema_of(req), grammar=req.grammar)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            # the client writes the whole prompt, special tokens included (as llama-server's /completion): parsed
            return req, model, state.engine.tokenize(prompt, special=True, add_bos=True), plan
        n_vocab = getattr(state.engine, "n_vocab", None)
        if n_vocab is not None and any(not 0 <= t < n_vocab for t in prompt):
            raise oa.bad_request(f"prompt: token ids must be in [0, {n_vocab})", param="prompt")
        return req, model, list(prompt), plan

    req, model, tokens, plan = await to_thread.run_sync(prepare)
    return await _run(state, request, ticket, req, model, "text", tokens, "prompt", plan)


def _schema_of(req: Any) -> tuple[str, Any] | None:
    """The JSON schema a request holds its reply to, and the field it came in (json_object: any object)."""
    given = [(field, schema) for field, schema in (
        ("response_format", _format_schema(req.response_format)), ("json_schema", req.json_schema))
        if schema is not None]
    if len(given) > 1:
        raise oa.bad_request("give either response_format or json_schema, not both", param="json_schema")
    return given[0] if given else None


def _format_schema(form: oa.ResponseFormat | None) -> Any:
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return JSON_OBJECT
    if form.json_schema is None or form.json_schema.schema_ is None:
        raise oa.bad_request("response_format: json_schema.schema is required", param="response_format")
    return form.json_schema.schema_


def _choice_of(req: oa.ChatCompletionRequest) -> Any:
    choice = req.tool_choice
    return choice.model_dump() if isinstance(choice, oa.NamedToolChoice) else choice


def _model(state: ServerState, name: str | None) -> str:
    if name is None or name == state.model_id or name in state.aliases:
        return state.model_id
    raise oa.APIError(400, f"The model `{name}` does not exist; this server runs `{state.model_id}` "
                           "(see /v1/models)", param="model", code="model_not_found")


async def _run(state: ServerState, request: Request, ticket: Ticket, req: Any, model: str, kind: str,
               tokens: list[int], param: str, plan: OutputPlan, rendered: str | None = None) -> Response:
    params = dataclasses.replace(req.generation_params(seed=random.getrandbits(32)), grammar=plan.grammar,
                                 preserved=plan.preserved)
    check_prompt(state, tokens, param, params.n)
    partition = partition_of(request)
    run = Run(state.scheduler, tokens, params, plan.tools, ticket=ticket, partition=partition)
    reply = Reply(kind, model, state.fingerprint, logprobs=params.logprobs is not None)  # type: ignore[arg-type]

    def usage() -> Usage:
        return Usage(len(tokens), run.completion_tokens, run.cached_tokens)

    def remember() -> None:  # a plain chat reply comes back in the next request: keep its sampled tokens
        done = run.finished.get(0)
        if rendered is not None and params.n == 1 and plan.tools is None and done is not None:
            remember_reply(state, rendered, tokens, run.text(0), done, partition)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(run, reply, include_usage, usage, remember), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    choices = await unless_disconnected(request, run.collect(), run)
    if choices is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    remember()
    return JSONResponse(reply.complete(choices, usage()))


async def _stream(run: Run, reply: Reply, include_usage: bool, usage: Callable[[], Usage],
                  remember: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        if reply.kind == "chat":
            yield sse(reply.first_chunk(run.n))
        try:
            async for deltas in run.deltas():
                chunk = reply.chunk(deltas)
                if chunk is not None:
                    yield sse(chunk)
        except oa.APIError as error:  # the scheduler's Failed: the stream ends with the error
            yield sse(public_error(error).body())
            return
        remember()
        if include_usage:
            yield sse(reply.usage_chunk(usage()))
        yield sse("[DONE]")
    finally:
        run.cancel()  # a no-op once it is done; a client that went away ends its generation here
