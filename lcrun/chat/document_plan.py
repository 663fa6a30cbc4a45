"""`lcrun chat -f …` before the model loads: the documents counted with the model's own tokenizer — its vocabulary
loaded alone (lcrun.engine.vocab.VocabularyFile: no weights, no context) — in the chat format around them, exactly the
tokens the session will prefill; the context sized to them (lcrun.launch.sizing, `--ctx auto`) or refused with the
fix; and what each document will cost to prefill at this machine's measured speed (lcrun.prefill_speed), when
`lcrun bench` has measured it. The same for `--dry-run`, which loads no engine."""
from __future__ import annotations

import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lcrun.context_fit import ANSWER_RESERVE

from .conversation import Conversation
from .documents import already_held
from .prompt_count import count_prompt

if TYPE_CHECKING:
    from lcrun.documents import Document
    from lcrun.launch.decide import Launch
    from lcrun.prefill_speed import PrefillSpeed

# the interactive chat keeps room for its questions and answers beside the documents: a few turns before the
# oldest are dropped (never the documents)
CONVERSATION_ROOM = 4096


@dataclass(frozen=True)
class DocumentRow:
    document: Document
    tokens: int                  # what it adds to the prompt, as llama.cpp tokenizes it there
    start: int                   # the prompt position it starts at
    prefill_s: float | None      # at the measured speed; None: not measured with these settings


@dataclass(frozen=True)
class DocumentPlan:
    rows: tuple[DocumentRow, ...]
    already: tuple[str, ...]     # documents the restored --session holds already (not added twice)
    prompt_tokens: int           # the prompt before the answer: system, documents, conversation (and -p's question)
    reserve: int                 # kept free: the answer (-p), or the conversation
    reserve_for: str
    n_ctx: int
    how: str                     # how the context was chosen ("--ctx auto", "-c 8k", "--session's context")
    speed: PrefillSpeed | None   # this machine's, for these settings
    count_s: float               # loading the vocabulary and counting
    fragments: Mapping[str, array] = field(default_factory=dict, repr=False)   # the documents' tokens, by text:
                                 # the same vocabulary's, so the session need not tokenize them again

    @property
    def document_tokens(self) -> int:
        return sum(row.tokens for row in self.rows)

    @property
    def prefill_s(self) -> float | None:
        times = [row.prefill_s for row in self.rows]
        return None if not times or None in times else sum(t for t in times if t is not None)

    @property
    def extrapolated(self) -> bool:
        """Whether an estimate reaches past the deepest depth bench measured (so it is a guess there)."""
        return self.speed is not None and any(row.start + row.tokens > self.speed.deepest for row in self.rows)


def plan_documents(launch: Launch, documents: Sequence[Document], *, system: str | None = None,
                   question: str | None = None, max_tokens: int | None = None,
                   saved: tuple[Conversation, int] | None = None) -> tuple[Launch, DocumentPlan]:
    """The launch sized to the documents and the plan the chat shows before loading. `saved`: a --session file's
    conversation and context, to be restored (its documents are not added again; its context is kept when they
    fit; its system prompt stands unless `system` replaces it). Raises lcrun.launch.sizing.PromptDoesNotFit (one
    line with the fix) when they cannot fit."""
    from lcrun.engine.vocab import VocabularyFile
    from lcrun.launch.sizing import size_to_prompt
    from lcrun.prefill_speed import measured_speed

    assert launch.chat_format is not None, "a chat launch has a chat format"
    messages, saved_ctx = (saved[0].messages, saved[1]) if saved is not None else ([], None)
    if system is None and saved is not None:
        system = saved[0].system
    new = [d for d in documents if not already_held(messages, d)]
    held = tuple(d.name for d in documents if already_held(messages, d))
    started = time.perf_counter()
    with VocabularyFile(launch.model_path) as vocabulary:
        count = count_prompt(vocabulary, launch.chat_format, new, system=system, messages=messages,
                             question=question)
    count_s = time.perf_counter() - started
    if question is None:  # room for the conversation, less where the model's maximum context leaves less
        room = max(CONVERSATION_ROOM, max_tokens or 0)
        reserve = min(room, max(max_tokens or ANSWER_RESERVE, launch.spec.n_ctx_train - count.prompt))
        reserve_for = "the conversation"
    else:
        reserve, reserve_for = max_tokens or ANSWER_RESERVE, "the answer"
    subject = new[0].name if len(new) == 1 else f"{len(new)} documents"
    sized = size_to_prompt(launch, count.prompt, reserve, subject=subject, reserve_for=reserve_for,
                           keep_ctx=saved_ctx)
    launch = sized.launch
    estimate, config = launch.choice.estimate, launch.config
    speed = measured_speed(launch.model_path, {
        "type_k": estimate.type_k, "type_v": estimate.type_v, "flash_attn": estimate.flash_attn,
        "n_gpu_layers": estimate.n_gpu_layers, "n_threads": config.n_threads, "n_ubatch": config.n_ubatch})
    rows = tuple(DocumentRow(d, n, start, speed.seconds(start, start + n) if speed else None)
                 for d, n, start in zip(new, count.documents, count.starts))
    return launch, DocumentPlan(rows, held, count.prompt, reserve, reserve_for, config.n_ctx, sized.how, speed,
                                count_s, count.fragments)
