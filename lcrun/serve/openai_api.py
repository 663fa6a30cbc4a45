"""OpenAI's request shapes for `/v1/chat/completions` and `/v1/completions` (with llama-server's extensions: `top_k`,
`min_p`, `json_schema`, `grammar` …), and its error object; the response shapes are in openai_reply.py. Requests are
validated strictly (a string where a number belongs is an error, not a coercion); unknown fields are ignored, as
llama-server does. What the server cannot honour (logit_bias, echo, suffix, best_of) is refused with a 400 naming the
parameter, never silently dropped."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lcrun.engine.protocol import Sampling
from lcrun.generation.records import MAX_CHOICES, MAX_TOP_LOGPROBS, GenerationParams, RequestError
from lcrun.json_bounds import MAX_JSON_DEPTH, json_depth
from lcrun.tool_calls.formats import MAX_CALLS
from lcrun.tool_calls.specs import MAX_TOOLS

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


class FunctionCall(_Strict):
    name: str = Field(max_length=64)
    arguments: str | dict[str, Any] = "{}"     # OpenAI sends a JSON text; some clients an object


class ToolCallIn(_Strict):
    id: str | None = Field(None, max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_CALLS)
    tool_call_id: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionSpec(_Strict):
    name: str = Field(max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpecIn(_Strict):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str = Field(max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama-server's extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    # structured output: OpenAI's response_format, and llama-server's own fields
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

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
            max_tokens=self.reply_limit(), stop=tuple(self.stop_strings()), ignore_eos=self.ignore_eos,
            logprobs=self.top_logprobs_asked(), n=self.n)

    def reply_limit(self) -> int | None:
        return self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        return None

    def refuse_unsupported(self) -> None:
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
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolSpecIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as dicts (OpenAI's "developer" role is the system prompt of newer models); assistant calls
        and tool results keep their fields for the tool-call formats (lcrun.tool_calls.prompt)."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None and m.role == "tool":
                message["name"] = m.name
            out.append(message)
        return out


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
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
