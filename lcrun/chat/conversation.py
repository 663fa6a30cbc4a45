"""The conversation as the model sees it: a system prompt, pinned documents, and turns — rendered through the model's
chat format into one prompt, and trimmed (oldest unpinned turns first) when it would not fit the context.

Documents come first, in the order they were given, before the turns: the prompt's prefix is then the same from turn
to turn and from run to run, so the KV cache (across turns, in a `--session` file, in serve's prompt cache) holds
the documents once and every question reuses them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lcrun.documents.record import wrap_document

from .prompt_tokens import render_marked
from .template import ChatRenderer


@dataclass
class Message:
    role: str                       # "user" or "assistant" (the system prompt lives apart)
    content: str
    document: str | None = None     # a pinned document's name: never dropped to make room
    interrupted: bool = False       # a reply stopped by the user
    about: str | None = None        # a document's kind and size as read ("pdf, 412 pages"), for /docs

    @property
    def pinned(self) -> bool:
        return self.document is not None


def document_text(name: str, text: str) -> str:
    return wrap_document(name, text)  # one wrapping for the chat and `lcrun read`


@dataclass
class Conversation:
    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def template_messages(self, messages: list[Message] | None = None) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": m.role, "content": m.content} for m in (self.messages if messages is None else messages)]

    def render(self, template: ChatRenderer, *, add_generation_prompt: bool = True,
               messages: list[Message] | None = None) -> str:
        """The prompt with the messages' text marked as content (prompt_tokens.py): tokenized, it has special tokens
        only where the template put them."""
        return render_marked(template, self.template_messages(messages), add_generation_prompt=add_generation_prompt)

    def documents_end(self) -> int:
        """Where the next document goes: after the documents that lead the conversation, before its first turn."""
        return next((i for i, m in enumerate(self.messages) if not m.pinned), len(self.messages))

    def document_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m.pinned]

    def droppable_turn(self) -> tuple[int, int] | None:
        """[start, end) of the oldest unpinned turn (a user message and the replies after it), never the last
        user message (the question being asked)."""
        last_user = max((i for i, m in enumerate(self.messages) if m.role == "user" and not m.pinned), default=-1)
        for i, m in enumerate(self.messages):
            if m.pinned or i >= last_user:
                continue
            # a user message with its replies, or replies left alone (after a document, or a /load-ed transcript)
            end = i + 1
            while end < len(self.messages) and self.messages[end].role == "assistant":
                end += 1
            return i, end
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [asdict(m) for m in self.messages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        system = data.get("system")
        raw = data.get("messages")
        if (system is not None and not isinstance(system, str)) or not isinstance(raw, list):
            raise ValueError("expected {'system': str|null, 'messages': [...]}")
        messages = []
        for item in raw:
            if not isinstance(item, dict) or item.get("role") not in ("user", "assistant") or \
                    not isinstance(item.get("content"), str):
                raise ValueError("every message needs a role (user/assistant) and a content string")
            about = item.get("about")
            messages.append(Message(item["role"], item["content"], item.get("document"), bool(item.get("interrupted")),
                                    about if isinstance(about, str) else None))
        return cls(system, messages)


@dataclass(frozen=True)
class Fitted:
    text: str              # the prompt as rendered
    tokens: list[int]
    dropped_turns: int
    dropped_tokens: int


def fit_to_context(conversation: Conversation, template: ChatRenderer, tokenize: Callable[[str], list[int]],
                   budget: int) -> Fitted | None:
    """Drop the oldest unpinned turns until the prompt is at most `budget` tokens; None if even the system prompt,
    the pinned documents and the question alone are too long (then nothing is dropped)."""
    text = conversation.render(template)
    tokens = tokenize(text)
    if len(tokens) <= budget:
        return Fitted(text, tokens, 0, 0)
    before = len(tokens)
    trial = list(conversation.messages)
    dropped = 0
    while len(tokens) > budget:
        span = Conversation(conversation.system, trial).droppable_turn()
        if span is None:
            return None
        del trial[span[0]:span[1]]
        dropped += 1
        text = conversation.render(template, messages=trial)
        tokens = tokenize(text)
    conversation.messages[:] = trial
    return Fitted(text, tokens, dropped, before - len(tokens))
