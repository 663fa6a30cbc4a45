"""Ollama's API on the same server, for the clients that speak only it (VS Code Copilot's Ollama provider asks
/api/version and /api/show; Page Assist, Obsidian plugins, scripts on the `ollama` package): request bodies, their
`options` mapped onto the decode loop's parameters, and the response shapes, as the `ollama` Python package's types
(0.6) and ollama/ollama's api/types.go lay them out. The routes are in ollama_routes.py.

`options` that the loop has (num_predict, temperature, top_k, top_p, min_p, seed, stop, repeat_penalty,
presence_penalty, frequency_penalty) are used; those fixed when the server started (num_gpu, num_thread, num_batch,
…) or samplers it does not run (mirostat, tfs_z, typical_p ≠ 1) are a 400 naming them, as is `num_ctx` above what a
slot holds (a smaller one is honoured: the prompt and reply fit it); `keep_alive` is accepted (the model stays loaded
while the server runs); unknown option names are ignored, as Ollama ignores them."""
from __future__ import annotations

import datetime as dt
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lcrun.engine.protocol import Sampling
from lcrun.generation.records import MAX_TOP_LOGPROBS, GenerationParams, RequestError
from lcrun.tool_calls.specs import ToolCall

from .openai_api import APIError, bad_request
from .openai_reply import chat_logprobs
from .respond import Choice, Delta

# the Ollama API release whose shapes this server follows (clients check /api/version against their minimum)
OLLAMA_VERSION = "0.12.0"
LOAD_TIME = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                       "use_mmap", "use_mlock", "embedding_only", "num_thread"})


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OllamaMessage(_Lenient):
    role: str = Field(max_length=32)
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class _OllamaGeneration(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = True                     # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class OllamaChatRequest(_OllamaGeneration):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_OllamaGeneration):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class ModelRequest(_Lenient):
    model: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)   # the older spelling


def format_schema(form: str | dict[str, Any] | None) -> tuple[str, Any] | None:
    """Ollama's `format`: "json" (a JSON object, as Ollama's JSON grammar) or a JSON schema."""
    if form in (None, ""):
        return None
    if form == "json":
        return ("format", {"type": "object"})
    if isinstance(form, dict):
        return ("format", form)
    raise bad_request(f"format: {form!r} is neither \"json\" nor a JSON schema", param="format")


def generation_params(options: dict[str, Any] | None, *, n_ctx_slot: int, prompt_tokens: int, seed: int,
                      logprobs: int | None) -> GenerationParams:
    """`options` as the decode loop takes them (Sampling's defaults, llama.cpp's, for what is not given)."""
    options = dict(options or {})
    fixed = sorted(k for k in options if k in LOAD_TIME)
    if fixed:
        raise bad_request(f"options: {', '.join(fixed)} are set when lcrun serve starts and cannot change per request",
                          param="options")
    for key, neutral in (("mirostat", 0), ("tfs_z", 1.0), ("typical_p", 1.0), ("penalize_newline", False),
                         ("repeat_last_n", 64)):
        if key in options and options[key] not in (None, neutral):
            raise bad_request(f"options.{key}: only {neutral!r} is supported", param="options")
    num_ctx = _number(options, "num_ctx", int)
    if num_ctx is not None and num_ctx > n_ctx_slot:
        raise bad_request(f"options.num_ctx: {num_ctx} is above the {n_ctx_slot} tokens a slot of this server holds "
                          "(its context is planned at start: lcrun serve --ctx, -np)", param="options")
    limit = _number(options, "num_predict", int)
    if limit is not None and limit < 0:
        limit = None   # -1: until the model stops, -2: until the context is full
    if num_ctx is not None:
        room = num_ctx - prompt_tokens
        if room <= 0:
            raise bad_request(f"the prompt's {prompt_tokens} tokens do not fit options.num_ctx {num_ctx}",
                              param="options")
        limit = room if limit is None else min(limit, room)
    default = Sampling()
    stop = options.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("options.stop: a list of strings", param="options")

    def value(key: str, kind: type, fallback: Any) -> Any:
        got = _number(options, key, kind)
        return fallback if got is None else got

    sampling = Sampling(temperature=value("temperature", float, default.temperature),
                        top_p=value("top_p", float, default.top_p), top_k=value("top_k", int, default.top_k),
                        min_p=value("min_p", float, default.min_p),
                        repeat_penalty=value("repeat_penalty", float, default.repeat_penalty),
                        presence_penalty=value("presence_penalty", float, 0.0),
                        frequency_penalty=value("frequency_penalty", float, 0.0),
                        seed=value("seed", int, seed))
    if sampling.repeat_penalty <= 0 or not 0 < sampling.top_p <= 1 or not 0 <= sampling.min_p <= 1:
        raise bad_request("options: repeat_penalty above 0, top_p in (0, 1], min_p in [0, 1]", param="options")
    params = GenerationParams(sampling, max_tokens=limit, stop=tuple(s for s in stop if s), logprobs=logprobs)
    try:
        params.check()   # the loop's own bounds (stop strings' count and length), as the OpenAI routes check them
    except RequestError as exc:
        raise bad_request(f"options.{exc.param}: {exc.problem}", param="options") from None
    return params


def _number(options: dict[str, Any], key: str, kind: type) -> Any:
    got = options.get(key)
    if got is None:
        return None
    if isinstance(got, bool) or not isinstance(got, (int, float)) or not math.isfinite(got) or \
            (kind is int and got != int(got)):
        raise bad_request(f"options.{key}: {got!r} is not {'an integer' if kind is int else 'a number'}",
                          param="options")
    return kind(got)


# -- responses --------------------------------------------------------------------------------------------------
def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def error_body(error: APIError) -> dict[str, Any]:
    return {"error": error.message}


def ollama_calls(calls: list[ToolCall] | tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments_object()}}
            for i, c in enumerate(calls)]


def ollama_logprobs(entries: Any) -> list[dict[str, Any]]:
    """Ollama's logprobs are OpenAI's chat entries (token, logprob, bytes, top_logprobs) without the wrapper."""
    return chat_logprobs(entries)["content"]


def stats(choice: Choice | Delta, prompt_tokens: int, started: float, now_s: float) -> dict[str, Any]:
    """Ollama's durations (nanoseconds) and counts, from the finish record."""
    done = choice.finished
    assert done is not None
    evaluated = done.prompt_tokens - done.reused_tokens
    prefill_s = evaluated / done.prefill_tokens_per_s if done.prefill_tokens_per_s else 0.0
    eval_s = max(now_s - started - done.time_to_first_token_s, 0.0)
    return {"done_reason": "stop" if done.reason == "stop" else done.reason,
            "total_duration": int((now_s - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": evaluated, "prompt_eval_duration": int(prefill_s * 1e9),
            "eval_count": done.completion_tokens, "eval_duration": int(eval_s * 1e9)}
