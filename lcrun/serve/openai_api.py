"""OpenAI's request and response shapes for `/v1/chat/completions`, `/v1/completions` and `/v1/models`, and its error
object. Requests are validated strictly (a string where a number belongs is an error, not a coercion); unknown fields
are ignored, as llama-server does. What the server cannot honour (several choices, logprobs, tools) is refused with a
400 naming the parameter, never silently dropped."""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lcrun.engine.protocol import Sampling
from lcrun.generation.records import GenerationParams, RequestError

@dataclass
class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return self.message


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after_s: int = 1, code: str | None = None) -> APIError:
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)})


def context_length_exceeded(prompt_tokens: int, n_ctx_slot: int, param: str) -> APIError:
    return bad_request(f"This model's maximum context length is {n_ctx_slot} tokens per slot. However, your "
                       f"{param} resulted in {prompt_tokens} tokens (and at least 1 more is needed for the reply). "
                       f"Please reduce the length of the {param}.", param=param, code="context_length_exceeded")


# -- requests ---------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """What both endpoints take."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama-server's extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def generation_params(self, seed: int) -> GenerationParams:
        """The request as the decode loop takes it. What the client leaves unset is `Sampling`'s default — lcrun's
        one source of sampling defaults, llama.cpp's own (llama-server answers OpenAI clients with the same: temperature
        0.8, where OpenAI's API says 1.0) — and `seed` when no seed is given."""
        default = Sampling()
        return GenerationParams(
            Sampling(
                temperature=default.temperature if self.temperature is None else self.temperature,
                top_p=default.top_p if self.top_p is None else self.top_p,
                top_k=default.top_k if self.top_k is None else self.top_k,
                min_p=default.min_p if self.min_p is None else self.min_p,
                repeat_penalty=default.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
                frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                seed=seed if self.seed is None else self.seed),
            max_tokens=self.reply_limit(), stop=tuple(self.stop_strings()), ignore_eos=self.ignore_eos)

    def reply_limit(self) -> int | None:
        return self.max_tokens

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise bad_request("only n=1 is supported (one choice per request)", param="n")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if len(self.stop_strings()) > 4:
            raise bad_request("at most 4 stop sequences", param="stop")
        try:
            self.generation_params(0).check()   # the loop's own bounds (a stop string's length)
        except RequestError as exc:
            raise bad_request(exc.problem, param=exc.param) from None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported", param="logprobs")
        if self.tools:
            raise bad_request("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format type 'text' is supported", param="response_format")
        if any(m.role == "tool" for m in self.messages):
            raise bad_request("tool messages are not supported", param="messages")

    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        # OpenAI's "developer" role is the system prompt of newer models
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs")
        if self.echo:
            raise bad_request("echo is not supported", param="echo")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise bad_request("best_of is not supported", param="best_of")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise bad_request("one prompt per request", param="prompt")

    def single_prompt(self) -> str | list[int]:
        """The prompt as text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # type: ignore[assignment]
        return prompt  # type: ignore[return-value]


MAX_JSON_DEPTH = 64      # OpenAI's requests nest about 6 deep (tools' JSON schemas more): far below Python's limit
_JSON_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, counted before parsing (the parser recurses once per
    level): brackets inside strings do not count. Linear, in C but for one step per bracket."""
    brackets = _JSON_STRINGS.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for step in map(_DEPTH_STEP.__getitem__, brackets):
        depth += step
        deepest = max(deepest, depth)
    return deepest


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep",
                          code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:  # the depth count above makes this unreachable; kept as the last line of defence
        raise bad_request("the request body nests too deep", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def validate(model: type[_Generation], body: dict[str, Any]) -> Any:
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        # pydantic names the union member it tried ("str", "list[TextPart]"): not part of the path
        loc = [part for part in error["loc"] if isinstance(part, int) or (part.isidentifier() and part.islower()
                                                                           and part not in _TYPE_NAMES)]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
        problem = "is required" if error["type"] == "missing" else error["msg"][0].lower() + error["msg"][1:]
        raise bad_request(f"{where}: {problem}", param=str(loc[0]) if loc else None,
                          code="missing_required_parameter" if error["type"] == "missing" else "invalid_type") \
            from None
    request.refuse_unsupported()
    return request


# -- responses ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Reply:
    """The fixed fields of one response (id, created, model) and the bodies and stream chunks built from them."""

    def __init__(self, kind: Literal["chat", "text"], model: str, fingerprint: str) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def complete(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": finish_reason}])
        body["usage"] = usage.to_dict()
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                             "finish_reason": finish_reason}])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                   "finish_reason": finish_reason}])

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [])
        body["usage"] = usage.to_dict()
        return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
