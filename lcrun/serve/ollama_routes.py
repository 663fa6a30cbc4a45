"""Ollama's endpoints: /api/version, /api/tags, /api/show (capabilities, the context a request can use), /api/ps,
/api/chat and /api/generate (NDJSON streams unless `"stream": false`), on the scheduler and decode loop the OpenAI
endpoints use — the same structured output, tool calls and log-probabilities. Errors are Ollama's
`{"error": "…"}`, in a stream as its last line."""
from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyio import to_thread
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .ollama_api import (OLLAMA_VERSION, ModelRequest, OllamaChatRequest, OllamaGenerateRequest, error_body,
                         format_schema, generation_params, now, ollama_calls, ollama_logprobs, stats)
from .openai_api import APIError, bad_request, parse_json_body
from .jobs import Ticket
from .prompting import _tokenize_chat, chat_prompt, check_prompt, partition_of
from .respond import Choice, Run, admitted, public_error, unless_disconnected
from .structured import output_plan

if TYPE_CHECKING:
    from .state import ServerState

OLLAMA_ENDPOINTS = frozenset({"/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate"})
NDJSON = "application/x-ndjson"
FAR_FUTURE = "2318-01-01T00:00:00Z"   # /api/ps's expires_at: the model stays loaded while the server runs


def ollama_routes(state: ServerState, endpoint: Callable[..., Any]) -> list[Route]:
    def route(path: str, handler: Any, method: str) -> Route:
        return Route(path, endpoint(state, handler, error_body), methods=[method])

    return [route("/api/version", _version, "GET"), route("/api/tags", _tags, "GET"),
            route("/api/show", _show, "POST"), route("/api/ps", _ps, "GET"),
            route("/api/chat", admitted(_chat), "POST"), route("/api/generate", admitted(_generate), "POST")]


def _validate(model: type, raw: bytes) -> Any:
    try:
        return model.model_validate(parse_json_body(raw))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise bad_request(f"{where}: {error['msg']}") from None


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _check_model(state: ServerState, name: str | None) -> None:
    known = {state.model_id, *state.aliases}
    if name is None or name in known or name.removesuffix(":latest") in known or name == _tagged(state.model_id):
        return
    raise APIError(404, f"model \"{name}\" not found; this server runs \"{_tagged(state.model_id)}\" (see /api/tags)")


# -- what the model is -------------------------------------------------------------------------------------------
def _details(state: ServerState) -> dict[str, Any]:
    meta = state.engine.metadata
    arch = meta.get("general.architecture", "llama")
    level = ""
    try:
        import gguf

        level = gguf.LlamaFileType(int(meta.get("general.file_type", ""))).name.removeprefix("MOSTLY_")
    except (ValueError, KeyError):
        pass
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": meta.get("general.size_label", ""), "quantization_level": level}


def _entry(state: ServerState) -> dict[str, Any]:
    path = Path(state.engine.config.model_path)
    stat = path.stat() if path.exists() else None
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime if stat else state.created))
    return {"name": _tagged(state.model_id), "model": _tagged(state.model_id), "modified_at": modified,
            "size": stat.st_size if stat else 0, "digest": state.fingerprint, "details": _details(state)}


async def _version(state: ServerState, request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


async def _tags(state: ServerState, request: Request) -> Response:
    return JSONResponse({"models": [_entry(state)]})


async def _ps(state: ServerState, request: Request) -> Response:
    entry = _entry(state)
    on_gpu = state.engine.config.n_gpu_layers != 0
    return JSONResponse({"models": [{**entry, "expires_at": FAR_FUTURE, "size_vram": entry["size"] if on_gpu else 0,
                                     "context_length": state.n_ctx_slot}]})


async def _show(state: ServerState, request: Request) -> Response:
    req: ModelRequest = _validate(ModelRequest, await request.body())
    _check_model(state, req.model or req.name)
    meta = state.engine.metadata
    arch = meta.get("general.architecture", "llama")
    info: dict[str, Any] = {k: _number(v) for k, v in meta.items() if not k.startswith("tokenizer.")}
    # what one request can use: a slot's share of the planned context (the trained length is lcrun.n_ctx_train)
    info[f"{arch}.context_length"] = state.n_ctx_slot
    info["lcrun.n_ctx_train"] = state.engine.n_ctx_train
    return JSONResponse({"modelfile": "", "parameters": "", "template": state.template_source or "",
                         "details": _details(state), "model_info": info,
                         "capabilities": ["completion", "tools"], "modified_at": _entry(state)["modified_at"]})


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


# -- generation --------------------------------------------------------------------------------------------------
def _chat_messages(req: OllamaChatRequest) -> list[dict[str, Any]]:
    """Ollama's messages in OpenAI's shape for the tool-call formats: calls get ids (nine digits, which every
    template takes) and each tool result the id of the call it answers, in order."""
    out: list[dict[str, Any]] = []
    made: list[str] = []
    answered = 0
    for i, m in enumerate(req.messages):
        if m.images:
            raise bad_request(f"messages[{i}].images: this model reads text only", param="messages")
        if m.role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"messages[{i}].role: {m.role!r} is not system, user, assistant or tool")
        message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise bad_request(f"messages[{i}].tool_calls: each is {{\"function\": {{\"name\", \"arguments\"}}}}")
                made.append(f"{len(made) + 1:09d}")
                calls.append({"id": made[-1], "type": "function",
                              "function": {"name": function.get("name"), "arguments": function.get("arguments", {})}})
            message["tool_calls"] = calls
        if m.role == "tool":
            message["tool_call_id"] = made[answered] if answered < len(made) else f"{answered + 1:09d}"
            answered += 1
        out.append(message)
    return out


# As the OpenAI routes: a place in the admission bound before anything is parsed or tokenized (respond.admitted);
# cached prompts and remembered replies within the request's API key.
async def _chat(state: ServerState, request: Request, ticket: Ticket) -> Response:
    raw = await request.body()
    partition = partition_of(request)

    def prepare() -> tuple[OllamaChatRequest, Any, Any, list[int]]:
        req: OllamaChatRequest = _validate(OllamaChatRequest, raw)
        _check_model(state, req.model)
        if req.think:
            raise bad_request("think: this model does not think aloud")
        if state.template is None:
            raise bad_request("this model has no chat template; use /api/generate with raw: true")
        if not req.messages:
            return req, None, None, []
        plan = output_plan(state.engine, state.template_source, schema=format_schema(req.format),
                           tools=req.tools, parallel=True)
        tokens = _tokenize_chat(state, chat_prompt(state, _chat_messages(req), plan), partition)
        params = generation_params(req.options, n_ctx_slot=state.n_ctx_slot, prompt_tokens=len(tokens),
                                   seed=random.getrandbits(32), logprobs=req.top_logprobs_asked())
        return req, plan, params, tokens

    req, plan, params, tokens = await to_thread.run_sync(prepare)
    if params is None:  # an empty conversation loads the model (it is loaded)
        return JSONResponse({"model": req.model, "created_at": now(), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": "load"})
    return await _respond(state, request, ticket, req, "chat", tokens, params, plan)


async def _generate(state: ServerState, request: Request, ticket: Ticket) -> Response:
    raw = await request.body()
    partition = partition_of(request)

    def prepare() -> tuple[OllamaGenerateRequest, Any, Any, list[int]]:
        req: OllamaGenerateRequest = _validate(OllamaGenerateRequest, raw)
        _check_model(state, req.model)
        for field, why in (("suffix", "fill-in-the-middle is not supported"), ("images", "this model reads text "
                           "only"), ("template", "the model's chat template cannot be replaced per request"),
                           ("think", "this model does not think aloud")):
            if getattr(req, field):
                raise bad_request(f"{field}: {why}", param=field)
        if not req.prompt and not req.context:
            return req, None, None, []
        context = list(req.context or [])
        n_vocab = getattr(state.engine, "n_vocab", None)
        if n_vocab is not None and any(not 0 <= t < n_vocab for t in context):
            raise bad_request(f"context: token ids must be in [0, {n_vocab})", param="context")
        plan = output_plan(state.engine, None, schema=format_schema(req.format))
        if req.raw or state.template is None:
            tokens = context + state.engine.tokenize(req.prompt or "", special=True, add_bos=not context)
        else:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                [{"role": "user", "content": req.prompt or ""}]
            tokens = context + _tokenize_chat(state, chat_prompt(state, messages, plan), partition)
        params = generation_params(req.options, n_ctx_slot=state.n_ctx_slot, prompt_tokens=len(tokens),
                                   seed=random.getrandbits(32), logprobs=req.top_logprobs_asked())
        return req, plan, params, tokens

    req, plan, params, tokens = await to_thread.run_sync(prepare)
    if params is None:  # no prompt: load (or, with keep_alive 0, unload) — the model stays loaded either way
        unload = req.keep_alive in (0, "0", "0s", "0m")
        return JSONResponse({"model": req.model, "created_at": now(), "response": "", "done": True,
                             "done_reason": "unload" if unload else "load"})
    return await _respond(state, request, ticket, req, "generate", tokens, params, plan)


async def _respond(state: ServerState, request: Request, ticket: Ticket, req: Any, kind: str, tokens: list[int],
                   params: Any, plan: Any) -> Response:
    import dataclasses

    params = dataclasses.replace(params, grammar=plan.grammar, preserved=plan.preserved)
    check_prompt(state, tokens, "messages" if kind == "chat" else "prompt")
    started = time.perf_counter()
    run = Run(state.scheduler, tokens, params, plan.tools, ticket=ticket, partition=partition_of(request))
    head = {"model": req.model}

    def body(content: str, calls: Any, logprobs: Any, finished: Choice | None) -> dict[str, Any]:
        out: dict[str, Any] = {**head, "created_at": now()}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": content}
            if calls:
                out["message"]["tool_calls"] = ollama_calls(calls)
        else:
            out["response"] = content
        if logprobs:
            out["logprobs"] = ollama_logprobs(logprobs)
        out["done"] = finished is not None
        if finished is not None:
            out.update(stats(finished, len(tokens), started, time.perf_counter()))
            if kind == "generate" and finished.finished is not None:
                out["context"] = tokens + list(finished.finished.tokens)
        return out

    if not req.stream:
        choices = await unless_disconnected(request, run.collect(), run)
        if choices is None:
            return Response(status_code=499)
        c = choices[0]
        return JSONResponse(body(c.content or "", c.calls, c.logprobs if params.logprobs is not None else None, c))

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for deltas in run.deltas():
                for d in deltas:
                    if d.content or d.calls or d.finished is not None:
                        done = d if d.finished is not None else None
                        yield _line(body(d.content, d.calls, d.logprobs if params.logprobs is not None else None,
                                         done))  # type: ignore[arg-type]
        except APIError as error:  # the scheduler's Failed: the stream's last line says so
            yield _line(error_body(public_error(error)))
        finally:
            run.cancel()

    return StreamingResponse(lines(), media_type=NDJSON)


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
