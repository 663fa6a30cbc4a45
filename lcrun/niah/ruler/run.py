"""Running the suite against a narrow interface: a `SuiteModel` that loads an engine for a KV type and a context,
and the `Answerer` it yields, which answers one prompt (greedy, at most `max_tokens`, stopping at end-of-turn) and
says how many prompt tokens it had to prefill — the rest it reused from its cache. Nothing here knows llama.cpp:
the launch and the decode loop plug in behind these Protocols.

Each finished cell is appended to a results log (lcrun.niah.results: one fsynced JSON line each), so a run that is
killed resumes with the cells it lacks. Events are typed records handed to `on_event` as they happen."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol

from lcrun.chat.template import ChatRenderer
from lcrun.kv_types import KvType

from .. import NiahError
from ..haystack import Haystack
from ..results import ResultsLog
from .grid import SuiteCell, suite_cells
from .prompts import PromptBuilder, Tokenizer
from .tasks import ESSAY_TASKS, PROMPT_FORMAT, TASKS, score

# a question and its chat-format close, for the estimate before anything is tokenized
_TAIL_ESTIMATE = 64


@dataclass(frozen=True)
class Answer:
    text: str
    prefilled_tokens: int     # prompt tokens evaluated; len(prompt) - prefilled_tokens came from the cache
    answer_tokens: int = 0
    prefill_seconds: float = 0.0   # of the answer's time, the prompt's evaluation (0: not measured apart)


class Answerer(Protocol):
    def answer(self, prompt_tokens: list[int], max_tokens: int, *,
               on_prefill: Callable[[int, int], None] | None = None) -> Answer:
        """Greedy decoding of at most `max_tokens`, stopping at end-of-generation; `on_prefill(done, total)` as the
        prompt is evaluated. Reuses whatever prefix of `prompt_tokens` its KV cache holds."""


class SuiteModel(Protocol):
    def load(self, kv: KvType, n_ctx: int) -> AbstractContextManager[Answerer]:
        """An engine with this KV cache type and a context of `n_ctx` tokens (the suite's longest length)."""


@dataclass(frozen=True)
class SuiteParams:
    lengths: tuple[int, ...]
    kv_types: tuple[KvType, ...] = (KvType("f16", "f16"),)
    tasks: tuple[str, ...] = TASKS
    # RULER runs 500 per task and length; 4 keeps a 128K grid to hours on one machine, and one wrong answer moves
    # a length's suite score by 100 / (6 × 4) ≈ 4 points
    samples: int = 4
    seed: int = 0

    @property
    def n_ctx(self) -> int:
        return max(self.lengths)


@dataclass(frozen=True)
class Throughput:
    """How fast cells go: prompt tokens evaluated per second, and the seconds an answer takes beside its prompt;
    from earlier cells (a resumed run's, or this run's first ones), or measured by the caller."""
    prefill_tokens_per_s: float
    answer_seconds: float = 0.0     # per cell

    def seconds(self, prefill_tokens: int, cells: int) -> float:
        return prefill_tokens / self.prefill_tokens_per_s + cells * self.answer_seconds


@dataclass
class Suite:
    params: SuiteParams
    cells: list[SuiteCell]
    builder: PromptBuilder
    notes: list[str] = field(default_factory=list)


def prepare_suite(tokenizer: Tokenizer, renderer: ChatRenderer, haystack: Haystack, params: SuiteParams) -> Suite:
    """Checks the grid and tokenizes the haystack once for the longest length. Prompts are built per cell, with
    `tokenizer`: it must stay open until the run ends. The shortest length's first prompts are built here, so a
    length too short for the instruction, the needles and the answer is refused before a model loads."""
    if not params.lengths or min(params.lengths) < 1:
        raise NiahError("--max-ctx", "no context length to run")
    cells = suite_cells(params.kv_types, params.lengths, params.tasks, params.samples)
    builder = PromptBuilder(tokenizer, renderer, haystack, seed=params.seed, max_ctx=params.n_ctx)
    builder.prompts(min(params.lengths), 0, params.tasks)
    notes = []
    if builder.stream.copies > 1:
        notes.append(f"the haystack ({builder.stream.file_tokens:,} tokens) is repeated {builder.stream.copies} "
                     f"times to reach {params.n_ctx:,} tokens")
    return Suite(params, cells, builder, notes)


def run_identity(model_path: Path, fingerprint: str, haystack: Haystack, params: SuiteParams,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """What must match for a resumed run's cells to compare with the earlier ones; the grid (lengths, KV types,
    tasks, samples) may grow. `settings`: flash attention, RoPE overrides, the chat format's key."""
    return {"suite": "ruler", "model": model_path.name, "model_bytes": model_path.stat().st_size,
            "fingerprint": fingerprint, "haystack_sha256": haystack.sha256, "seed": params.seed,
            "prompt_format": PROMPT_FORMAT, **settings}


def cell_key(record: dict[str, Any]) -> tuple[str, int, str, int]:
    return (str(record["kv"]), int(record["ctx"]), str(record["task"]), int(record["sample"]))


def planned_tokens(cells: Sequence[SuiteCell]) -> tuple[int, int]:
    """(prompt tokens of every cell, tokens to prefill when each document is prefilled once) — about, before the
    prompts are built: a length's prompts are about that long."""
    naive = sum(cell.ctx for cell in cells)
    shared = 0
    for (_kv, ctx, _sample), members in groupby(cells, key=lambda c: (c.kv, c.ctx, c.sample)):
        tasks = [c.task for c in members]
        essay = [t for t in tasks if t in ESSAY_TASKS]
        if essay:
            shared += ctx + _TAIL_ESTIMATE * (len(essay) - 1)
        if "cwe" in tasks:
            shared += ctx
    return naive, shared


def measured_throughput(records: Sequence[dict[str, Any]]) -> Throughput | None:
    """From finished cells: the prefill rate over the prompts' evaluation, the answers' time per cell. Cells of
    the shortest lengths prefill fastest (attention grows with the depth): an estimate from them is a lower bound."""
    prefill = sum(float(r.get("prefill_seconds", 0)) for r in records)
    total = sum(float(r.get("seconds", 0)) for r in records)
    tokens = sum(int(r.get("prefilled_tokens", 0)) for r in records)
    if prefill <= 0:   # records without the split: everything counted as prefill
        prefill = total
    if prefill <= 0 or tokens <= 0:
        return None
    return Throughput(tokens / prefill, max(0.0, total - prefill) / len(records))


@dataclass(frozen=True)
class SuitePlanned:
    total: int                   # cells in the grid
    done: int                    # of them already in the results log
    todo: list[SuiteCell]
    prompt_tokens: int           # about: every prompt prefilled in full (a naive run)
    prefill_tokens: int          # about: each document prefilled once
    seconds: float | None        # the estimate, when a throughput is known


@dataclass(frozen=True)
class SuiteEstimate:
    """The time left, once the run's first cell measured how fast this engine goes (a fresh run has no estimate
    before that)."""
    seconds: float
    throughput: Throughput


@dataclass(frozen=True)
class KvLoading:
    kv: KvType
    n_ctx: int


@dataclass(frozen=True)
class CellStarted:
    cell: SuiteCell
    index: int                   # among the cells to run now
    prompt_tokens: int
    cached_tokens: int           # the prefix shared with the prompt before, which a prefix cache reuses


@dataclass(frozen=True)
class CellPrefill:
    cell: SuiteCell
    done: int
    total: int


@dataclass(frozen=True)
class CellDone:
    cell: SuiteCell
    record: dict[str, Any]


SuiteEvent = SuitePlanned | SuiteEstimate | KvLoading | CellStarted | CellPrefill | CellDone


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def run_suite(model: SuiteModel, suite: Suite, log: ResultsLog, *,
              on_event: Callable[[SuiteEvent], None] = lambda event: None,
              clock: Callable[[], float] = time.perf_counter, throughput: Throughput | None = None) -> None:
    """Run the cells not yet in `log`, one engine per KV type. A KeyboardInterrupt leaves every finished cell in the
    log; the one in progress is lost."""
    finished = {cell_key(r) for r in log.done}
    todo = [cell for cell in suite.cells if cell.key not in finished]
    naive, shared = planned_tokens(todo)
    rate = throughput or measured_throughput(log.done)
    on_event(SuitePlanned(len(suite.cells), len(suite.cells) - len(todo), todo, naive, shared,
                          rate.seconds(shared, len(todo)) if rate and todo else None))
    index = 0
    left = shared
    for kv in suite.params.kv_types:
        mine = [cell for cell in todo if cell.kv == kv.label]
        if not mine:
            continue
        on_event(KvLoading(kv, suite.params.n_ctx))
        with model.load(kv, suite.params.n_ctx) as answerer:
            previous: list[int] = []
            for (ctx, sample), group in groupby(mine, key=lambda c: (c.ctx, c.sample)):
                wanted = {cell.task: cell for cell in group}
                for prompt in suite.builder.prompts(ctx, sample, tuple(wanted)):
                    cell = wanted[prompt.task]
                    if len(prompt.tokens) + prompt.question.max_tokens > ctx:
                        raise NiahError("ruler", f"a {cell.task} prompt of {len(prompt.tokens):,} tokens leaves no "
                                                 f"room for its answer in {ctx:,}")  # the builder's invariant
                    on_event(CellStarted(cell, index, len(prompt.tokens), _common_prefix(previous, prompt.tokens)))
                    started = clock()
                    answer = answerer.answer(prompt.tokens, prompt.question.max_tokens,
                                             on_prefill=lambda done, total: on_event(CellPrefill(cell, done, total)))
                    record = {
                        "kv": kv.label, "ctx": ctx, "task": cell.task, "sample": sample,
                        "score": round(score(answer.text, prompt.question), 4),
                        "expected": list(prompt.question.answers), "answer": answer.text[:500],
                        "prompt_tokens": len(prompt.tokens), "doc_tokens": prompt.doc_tokens,
                        "prefilled_tokens": answer.prefilled_tokens, "answer_tokens": answer.answer_tokens,
                        "seconds": round(clock() - started, 3), "prefill_seconds": round(answer.prefill_seconds, 3),
                    }
                    log.append(record)
                    log.done.append(record)
                    on_event(CellDone(cell, record))
                    previous = prompt.tokens
                    index += 1
                    left -= record["prefilled_tokens"]
                    if index == 1 and rate is None and (first := measured_throughput([record])):
                        on_event(SuiteEstimate(first.seconds(max(left, 0), len(todo) - 1), first))
