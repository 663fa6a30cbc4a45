"""Rendering a conversation in a Jinja chat template (the GGUF's tokenizer.chat_template, or a file the user names)
in a sandboxed environment as transformers does: a template comes with a downloaded file and must not reach the
filesystem or Python objects. Which format a model gets is decided in `formats.py`."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from lcrun.errors import LcrunError


class TemplateError(LcrunError):
    """The chat template is broken or refuses the conversation."""


class ChatRenderer(Protocol):
    """A conversation to prompt text: a Jinja template, a llama.cpp built-in format, or none (raw)."""
    @property
    def source(self) -> str:
        """What the prompt tokenizer scans for special tokens (a template's source; a name)."""

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str: ...


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

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text. A template that refuses the conversation gets consecutive same-role messages joined (for
        templates that insist on alternating roles), then also the system prompt folded into the first user message
        (for templates without a system role)."""
        return with_bos(self._render_any(messages, add_generation_prompt), self.bos_token, self.add_bos)

    def _render_any(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._render(messages, add_generation_prompt)
        except TemplateError as refused:
            for variant in (merge_same_roles(messages), fold_system(messages)):
                if variant != list(messages):
                    try:
                        return self._render(variant, add_generation_prompt)
                    except TemplateError:
                        continue
            raise refused

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return compile_template(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except _TemplateRaised as exc:
            raise TemplateError("chat template", str(exc)) from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateError("chat template", f"rendering failed: {exc}") from None


class _TemplateRaised(Exception):
    pass


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

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"], undefined=jinja2.Undefined)
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            _CACHE[source] = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError("chat template", f"not valid Jinja (line {exc.lineno}: {exc.message})") from None
    return _CACHE[source]


def merge_same_roles(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    merged: list[dict[str, str]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(dict(message))
    return merged


def fold_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    if not messages or messages[0]["role"] != "system":
        return merge_same_roles(messages)
    system, rest = messages[0]["content"], merge_same_roles(messages[1:])
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": system + "\n\n" + rest[0]["content"]}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]
