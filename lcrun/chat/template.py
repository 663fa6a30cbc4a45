"""Rendering a conversation in a Jinja chat template (the GGUF's tokenizer.chat_template, or a file the user names)
in a sandboxed environment as transformers does: a template comes with a downloaded file and must not reach the
filesystem or Python objects. Which format a model gets is decided in `formats.py`.

A rendering is bounded as well: in time (`RENDER_TIMEOUT_S`, checked on every line the compiled template runs), in
the text it makes (`MAX_OUTPUT_CHARS`), in what `*` and `**` may build, and its recursion and memory errors are
TemplateErrors — a conversation sent to a server must not hang a thread or end the process."""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any, Protocol

from lcrun.errors import LcrunError

from .prompt_tokens import unmark


class TemplateError(LcrunError):
    """The chat template is broken or refuses the conversation."""


class TemplateTooCostly(TemplateError):
    """Rendering went past a bound (time, size, recursion, memory): not worth trying again another way."""


class ChatRenderer(Protocol):
    """A conversation to prompt text: a Jinja template, a llama.cpp built-in format, or none (raw)."""
    @property
    def source(self) -> str:
        """What the prompt tokenizer scans for special tokens (a template's source; a name)."""

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """`tools` (OpenAI's shape) reach a Jinja template as its `tools` variable; other formats take none."""


def with_bos(text: str, bos_token: str, add_bos: bool) -> str:
    """The prompt as llama-server tokenizes it (add_special): one BOS first when the vocabulary says add_bos —
    never two, whether or not the format writes one itself."""
    return bos_token + text if add_bos and bos_token and not text.startswith(bos_token) else text


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text. A template that refuses the conversation gets consecutive same-role messages joined (for
        templates that insist on alternating roles), then also the system prompt folded into the first user message
        (for templates without a system role)."""
        return with_bos(self._render_any(messages, add_generation_prompt, tools), self.bos_token, self.add_bos)

    def _render_any(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None) -> str:
        try:
            return self._render(messages, add_generation_prompt, tools)
        except TemplateTooCostly:
            raise
        except TemplateError as refused:
            for variant in (merge_same_roles(messages), fold_system(messages)):
                if variant != list(messages):
                    try:
                        return self._render(variant, add_generation_prompt, tools)
                    except TemplateTooCostly:
                        raise
                    except TemplateError:
                        continue
            raise refused

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        import jinja2

        given = sum(len(m.get("content") or "") for m in messages) + (len(repr(tools)) if tools else 0)
        try:
            return bounded_render(compile_template(self.source), given, messages=list(messages),
                                  add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                  eos_token=self.eos_token, tools=tools)
        except _TemplateRaised as exc:  # its message may quote a message's (marked) text
            raise TemplateError("chat template", unmark(str(exc))) from None
        except _TooCostly as exc:
            raise TemplateTooCostly("chat template", str(exc)) from None
        except RecursionError:
            raise TemplateTooCostly("chat template", "rendering failed: it recursed too deep") from None
        except MemoryError:
            raise TemplateTooCostly("chat template", "rendering failed: it ran out of memory") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            raise TemplateError("chat template", f"rendering failed: {unmark(str(exc))}") from None


class _TemplateRaised(Exception):
    pass


class _TooCostly(Exception):
    pass


RENDER_TIMEOUT_S = 10.0
MAX_OUTPUT_CHARS = 16 << 20      # beside 4x the messages' own text
MAX_BUILT = 1 << 20              # items or characters one `*` may make, digits one `**` may make
_limits = threading.local()


def bounded_render(template: Any, given_chars: int, **context: Any) -> str:
    """`template.render(**context)`, stopped with _TooCostly past RENDER_TIMEOUT_S or past MAX_OUTPUT_CHARS plus four
    times the characters the messages hold. The time is checked by a trace function on the template's own frames
    only (each line it runs), so loops that produce nothing are bounded too."""
    limit = MAX_OUTPUT_CHARS + 4 * given_chars
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    _limits.deadline = deadline

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _TooCostly(f"rendering took longer than {RENDER_TIMEOUT_S:g} s")
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > limit:
                raise _TooCostly(f"rendering made more than {limit:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)
        _limits.deadline = None


def _check_deadline() -> None:
    deadline = getattr(_limits, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _TooCostly(f"rendering took longer than {RENDER_TIMEOUT_S:g} s")


def _bounded_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse what would build something huge in one C call, beyond the reach of the time check."""
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_BUILT:
                raise _TooCostly(f"the template builds a sequence of more than {MAX_BUILT:,} items")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
            right * max(abs(left).bit_length(), 1) > MAX_BUILT * 3:
        raise _TooCostly("the template computes a number too large")


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_CACHE: dict[str, Any] = {}


def compile_template(source: str) -> Any:
    """The compiled template; a syntax error is a TemplateError saying where."""
    if source not in _CACHE:
        import json

        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class BoundedEnvironment(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset({"*", "**"})

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                _bounded_binop(operator, left, right)
                return super().call_binop(context, operator, left, right)

            def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
                _check_deadline()
                return super().call(__context, __obj, *args, **kwargs)

        env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                                 undefined=jinja2.Undefined)
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            _CACHE[source] = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError("chat template", f"not valid Jinja (line {exc.lineno}: {exc.message})") from None
    return _CACHE[source]


def _plain(message: dict[str, Any]) -> bool:
    """A message of text only (a tool call or a tool's result is never joined to another)."""
    return message["role"] != "tool" and not message.get("tool_calls")


def merge_same_roles(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] and _plain(merged[-1]) and _plain(message):
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(dict(message))
    return merged


def fold_system(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages or messages[0]["role"] != "system":
        return merge_same_roles(messages)
    system, rest = messages[0]["content"], merge_same_roles(messages[1:])
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": system + "\n\n" + rest[0]["content"]}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]
