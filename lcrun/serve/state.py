"""What the server's request handlers share: the engine and its scheduler, metrics, the model's names, its chat
template and the prompt tokenizer over it, the edge's policy, the memory of recent replies. The OpenAI routes
(app.py) and Ollama's (ollama_routes.py) are handed the one `ServerState`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lcrun.chat.prompt_tokens import PromptTokenizer
from lcrun.chat.template import ChatRenderer, ChatTemplate
from lcrun.engine.protocol import EngineProtocol

from .edge import EdgePolicy, host_policy
from .metrics import Metrics
from .replies import ReplyMemory
from .scheduler import Scheduler

# as llama-server: no key needed to see that it is up; the API's shape is no secret either
PUBLIC_PATHS = frozenset({"/health", "/v1/models", "/openapi.json"})


def _loopback_edge() -> EdgePolicy:
    return EdgePolicy(host_policy("127.0.0.1", loopback=True), public_paths=PUBLIC_PATHS)


@dataclass
class ServerState:
    engine: EngineProtocol
    scheduler: Scheduler
    metrics: Metrics
    model_id: str
    template: ChatRenderer | None
    fingerprint: str = "lcrun"
    aliases: tuple[str, ...] = ()          # other names a request may give the model by
    edge: EdgePolicy = field(default_factory=_loopback_edge)   # Host, Origin, keys, body size (edge.py)
    created: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    replies: ReplyMemory = field(default_factory=ReplyMemory)
    prompt_tokens: PromptTokenizer = field(init=False)    # special tokens only where the template put them

    def __post_init__(self) -> None:
        # a small memo: long system prompts and documents that many requests share, not every client's text
        self.prompt_tokens = PromptTokenizer(self.engine.tokenize, self.engine.token_text, memo_tokens=2 << 20)

    @property
    def n_ctx_slot(self) -> int:
        return self.scheduler.n_ctx_slot

    @property
    def template_source(self) -> str | None:
        """The Jinja chat template's text (tool-call formats are told apart by it); None for other formats."""
        return self.template.source if isinstance(self.template, ChatTemplate) else None
