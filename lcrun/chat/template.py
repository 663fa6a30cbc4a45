"""The model's own chat template (tokenizer.chat_template in the GGUF), rendered in a sandboxed Jinja environment
as transformers does: a template comes with a downloaded file and must not reach the filesystem or Python objects."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lcrun.errors import LcrunError

# Used when a GGUF carries no template and its vocabulary has Llama 3's header tokens.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateError(LcrunError):
    """The chat template is broken or refuses the conversation."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "file"   # "file" or the name of the fallback used

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text. A template that refuses the conversation gets consecutive same-role messages joined (for
        templates that insist on alternating roles), then also the system prompt folded into the first user message
        (for templates without a system role)."""
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
            return _compiled(self.source).render(
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


def _compiled(source: str) -> Any:
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


def template_for(source: str | None, bos_token: str, eos_token: str, has_token: Any) -> ChatTemplate:
    """The file's template, or a fallback chosen by the special tokens the vocabulary has (`has_token(text)`)."""
    if source:
        _compiled(source)  # a syntax error is reported when the model is opened, not at the first question
        return ChatTemplate(source, bos_token, eos_token)
    if has_token("<|start_header_id|>") and has_token("<|eot_id|>"):
        return ChatTemplate(LLAMA3_TEMPLATE, bos_token, eos_token, origin="llama3 (the file has none)")
    if has_token("<|im_start|>"):
        return ChatTemplate(CHATML_TEMPLATE, bos_token, eos_token, origin="chatml (the file has none)")
    raise TemplateError("chat template", "the model file has none and its vocabulary matches no known format "
                                         "(add one when converting: tokenizer_config.json chat_template)")


def engine_template(engine: Any) -> ChatTemplate:
    """The template of the model an engine has loaded (its GGUF's, or the fallback its vocabulary suggests)."""
    special = engine.special_tokens()
    bos = engine.token_text(special["bos"]) if "bos" in special else ""
    eos = engine.token_text(special["eos"]) if "eos" in special else ""
    return template_for(engine.chat_template, bos, eos, lambda text: len(engine.tokenize(text)) == 1)
