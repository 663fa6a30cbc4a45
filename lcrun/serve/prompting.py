"""A chat request's prompt, for either API: the messages (and tools) rendered by the model's chat template with the
client's text marked as data, tokenized with special tokens only where the template put them, a reply the model
gave earlier kept as the tokens it was sampled as; and the checks a prompt must pass before it is queued."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from lcrun.chat.prompt_tokens import MarkedText, as_content, render_marked
from lcrun.errors import LcrunError
from lcrun.generation.records import Finished, RequestError
from lcrun.tool_calls.formats import detect_family
from lcrun.tool_calls.prompt import template_messages

from . import openai_api as oa

if TYPE_CHECKING:
    from .state import ServerState
    from .structured import OutputPlan


def chat_prompt(state: ServerState, messages: list[dict[str, Any]], plan: OutputPlan) -> MarkedText:
    """The rendered prompt; a 400 when the template refuses the messages (a Jinja template's raise_exception, a
    strict role order, llama.cpp refusing a built-in format) or a tool message cannot be read."""
    assert state.template is not None
    try:
        family = plan.family
        if family is None and any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            family = detect_family(state.template_source)   # earlier calls and results, no tools declared now
        if family is not None:
            messages, tools = template_messages(messages, family, plan.specs, plan.choice)
        else:
            tools = None
        return render_marked(state.template, messages, tools=tools)
    except RequestError as exc:
        raise oa.bad_request(f"{exc.param}: {exc.problem}", param="messages") from None
    except LcrunError as exc:
        raise oa.bad_request(f"the model's chat template refused the messages: {exc}", param="messages") from None


def partition_of(request: Request) -> str | None:
    """Whose cached prompts and remembered replies this request may share: its API key's id (edge.py), or
    everyone's without keys."""
    return request.scope.get("state", {}).get("api_key_id")


def _tokenize_chat(state: ServerState, text: MarkedText, partition: str | None) -> list[int]:
    tokenize = lambda t: state.prompt_tokens(MarkedText(t, text.contents))  # noqa: E731
    # a rendered chat ends with its replies: their sampled tokens, as the KV cache holds them (this key's only)
    return state.replies.tokenize(text, tokenize, partition)


def check_prompt(state: ServerState, tokens: list[int], param: str, n: int = 1) -> None:
    if not tokens:
        raise oa.bad_request(f"{param}: empty (no tokens)", param=param)
    if len(tokens) >= state.n_ctx_slot:
        raise oa.context_length_exceeded(len(tokens), state.n_ctx_slot, param)
    slots = len(state.scheduler.slots)
    if n > slots:
        raise oa.bad_request(f"n: {n} choices, but this server generates at most {slots} at once (one a slot: "
                             "lcrun serve -np)", param="n")


def remember_reply(state: ServerState, rendered: str, tokens: list[int], text: str, done: Finished,
                   partition: str | None) -> None:
    """Keep a finished reply's sampled tokens for the next request of the same key that quotes it (replies.py)."""
    if done.tokens and done.stop is None:  # the text is exactly its tokens'
        end = state.engine.token_text(done.tokens[-1]) if done.reason == "stop" else ""
        state.replies.remember(rendered + as_content(text) + end, tokens + list(done.tokens), partition)
