"""OpenAI's response shapes: a chat completion and its stream chunks (`delta`s with content, `tool_calls` and
`logprobs.content`), a text completion and its chunks (the legacy `logprobs`: tokens, token_logprobs, top_logprobs,
text_offset), usage, and server-sent events. One choice per `index`; `n` choices share one response."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from lcrun.generation.records import TokenLogprob
from lcrun.tool_calls.specs import ToolCall

from .respond import Choice, Delta


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{"token": _text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
                         "top_logprobs": [{"token": _text(p), "logprob": lp, "bytes": list(p)} for _, p, lp in e.top]}
                        for e in entries], "refusal": None}


def text_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's legacy shape; `offset`: characters of the reply before these tokens."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(_text(e.piece))
    return {"tokens": [_text(e.piece) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(p): lp for _, p, lp in e.top} for e in entries], "text_offset": offsets}


def tool_calls(calls: list[ToolCall] | tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


class Reply:
    """The fixed fields of one response (id, created, model) and the bodies and stream chunks built from them."""

    def __init__(self, kind: Literal["chat", "text"], model: str, fingerprint: str, *, logprobs: bool = False) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}       # per choice, characters of text sent (the legacy text_offset)

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def complete(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        if self.kind == "chat":
            out = []
            for c in choices:
                message: dict[str, Any] = {"role": "assistant", "content": c.content if c.content or not c.calls
                                           else None}
                if c.calls:
                    message["tool_calls"] = tool_calls(c.calls)
                out.append({"index": c.index, "message": message,
                            "logprobs": chat_logprobs(c.logprobs) if self.logprobs else None,
                            "finish_reason": c.finish_reason})
            body = self._envelope("chat.completion", out)
        else:
            body = self._envelope("text_completion", [
                {"index": c.index, "text": c.content or "",
                 "logprobs": text_logprobs(c.logprobs, 0) if self.logprobs else None,
                 "finish_reason": c.finish_reason} for c in choices])
        body["usage"] = usage.to_dict()
        return body

    def first_chunk(self, n: int) -> dict[str, Any]:
        """A chat stream opens with each choice's role."""
        return self._envelope("chat.completion.chunk", [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)])

    def chunk(self, deltas: list[Delta]) -> dict[str, Any] | None:
        """The stream chunk for a step's deltas (None when they carry nothing a client sees)."""
        out = []
        for d in deltas:
            if self.kind == "chat":
                delta: dict[str, Any] = {}
                if d.content:
                    delta["content"] = d.content
                if d.calls:
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls(d.calls))]
                if not delta and d.finish_reason is None:
                    continue
                logprobs = chat_logprobs(d.logprobs) if self.logprobs and d.logprobs else None
                out.append({"index": d.choice, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish_reason})
            else:
                if not d.content and d.finish_reason is None:
                    continue
                offset = self._offsets.get(d.choice, 0)
                self._offsets[d.choice] = offset + len(d.content)
                logprobs = text_logprobs(d.logprobs, offset) if self.logprobs and d.logprobs else None
                out.append({"index": d.choice, "text": d.content, "logprobs": logprobs,
                            "finish_reason": d.finish_reason})
        if not out:
            return None
        return self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", out)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [])
        body["usage"] = usage.to_dict()
        return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
