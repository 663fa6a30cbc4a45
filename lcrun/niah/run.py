"""A niah run: check the parameters (before any model loads), fit the grid to the engine's context, then run the
cells that are not in the results log yet, streaming typed events and appending each finished cell to the log."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lcrun.chat.formats import RAW, FormatChoice, engine_renderer
from lcrun.engine.protocol import GREEDY
from lcrun.generation.drive import generate
from lcrun.generation.records import Finished, GenerationParams, PrefillProgress, Request, TextChunk

from . import NiahError
from .grid import (GRADIENT_DEPTH_INTERVAL, GRADIENT_DIGITS, GRADIENT_MAX_CTX, GRADIENT_MIN_CTX, GRADIENT_SAMPLES,
                   Cell, context_lengths, depths, grid_cells)
from .haystack import Haystack, HaystackStream, build_stream
from .prompt import CITIES, PROMPT_FORMAT, Needle, PromptBuilder, needle_for
from .results import ResultsLog

ANSWER_SLACK = 16  # tokens an answer may spend around the number ("The number is …")


@dataclass(frozen=True)
class NiahParams:
    min_ctx: int = GRADIENT_MIN_CTX
    max_ctx: int = GRADIENT_MAX_CTX
    ctx_interval: int | None = None   # None: Gradient's 86,675 unless ctx_steps is given
    ctx_steps: int | None = None
    depth_interval: float = GRADIENT_DEPTH_INTERVAL
    samples: int = GRADIENT_SAMPLES
    digits: int = GRADIENT_DIGITS
    seed: int = 0

    @property
    def answer_tokens(self) -> int:
        return self.digits + ANSWER_SLACK

    def check(self) -> None:
        """Everything that can be refused before a model is loaded."""
        if self.ctx_interval is not None and self.ctx_steps is not None:
            raise NiahError("--ctx-interval", "cannot be combined with --ctx-steps: give one of them")
        context_lengths(self.min_ctx, self.max_ctx, interval=self.ctx_interval, steps=self.ctx_steps)
        depths(self.depth_interval)
        if self.samples < 1:
            raise NiahError("--samples", f"{self.samples} must be at least 1")
        if not 1 <= self.digits <= 64:
            raise NiahError("--digits", f"{self.digits} is out of range (1 to 64)")


def run_identity(model_path: Path, haystack: Haystack, params: NiahParams, settings: dict[str, Any]) -> dict[str, Any]:
    """What must match for a resumed run's cells to be comparable with the earlier ones. The grid may differ:
    resuming with a larger --max-ctx adds columns. `settings`: the engine's KV types, flash attention, RoPE."""
    return {"model": model_path.name, "model_bytes": model_path.stat().st_size, "haystack_sha256": haystack.sha256,
            "seed": params.seed, "digits": params.digits, "prompt_format": PROMPT_FORMAT, **settings}


@dataclass
class NiahRun:
    params: NiahParams
    contexts: list[int]
    depths: list[float]
    cells: list[Cell]
    stream: HaystackStream
    builder: PromptBuilder
    haystack: Haystack
    n_ctx: int
    max_ctx: int                      # the largest context after fitting it to the engine
    notes: list[str] = field(default_factory=list)


def prepare_run(engine: Any, params: NiahParams, haystack: Haystack,
                chat_format: FormatChoice | None = None) -> NiahRun:
    """`chat_format`: as chosen from the file's header (default: from the engine's vocabulary); RAW asks nothing,
    the prompt ends in a sentence for the model to complete."""
    params.check()
    raw = chat_format is not None and chat_format.kind == RAW.kind
    builder = PromptBuilder(engine, engine_renderer(engine, chat_format), completion=raw)
    room = builder.overhead(params.answer_tokens)
    max_ctx, notes = params.max_ctx, []
    if max_ctx > engine.n_ctx - room:
        max_ctx = engine.n_ctx - room
        notes.append(f"largest context capped at {max_ctx:,} tokens (asked {params.max_ctx:,}): the engine's "
                     f"context is {engine.n_ctx:,} and the question and answer need {room} more")
    if params.min_ctx > max_ctx:
        raise NiahError("--min-ctx", f"{params.min_ctx:,} is above the largest context that fits ({max_ctx:,}: "
                                     f"the engine's {engine.n_ctx:,} less {room} for the question and answer)")
    contexts = context_lengths(params.min_ctx, max_ctx, interval=params.ctx_interval, steps=params.ctx_steps)
    widest = builder.needle_length(Needle("9" * params.digits, max(CITIES, key=len)))
    if contexts[0] <= widest:
        raise NiahError("--min-ctx", f"{contexts[0]:,} tokens cannot hold the needle ({widest} tokens) and any "
                                     "haystack around it")
    depth_list = depths(params.depth_interval)
    stream = build_stream(engine, haystack, max(contexts))
    if stream.copies > 1:
        notes.append(f"the haystack ({stream.file_tokens:,} tokens) is repeated {stream.copies} times to reach "
                     f"{max(contexts):,} tokens")
    return NiahRun(params, contexts, depth_list, grid_cells(contexts, depth_list, params.samples), stream, builder,
                   haystack, engine.n_ctx, max_ctx, notes)


def cell_key(record: dict[str, Any]) -> tuple[int, float, int]:
    return Cell(int(record["ctx"]), float(record["depth"]), int(record["sample"])).key


def score(answer: str, needle: Needle) -> int:
    return int(needle.number in answer)


@dataclass(frozen=True)
class RunStarted:
    total: int          # cells in the grid
    done: int           # of them already in the results log
    todo: list[Cell]


@dataclass(frozen=True)
class CellStarted:
    cell: Cell
    index: int          # among the cells to run now
    prompt_tokens: int


@dataclass(frozen=True)
class CellPrefill:
    cell: Cell
    done: int
    total: int


@dataclass(frozen=True)
class CellDone:
    cell: Cell
    record: dict[str, Any]


NiahEvent = RunStarted | CellStarted | CellPrefill | CellDone


def run_cells(engine: Any, run: NiahRun, log: ResultsLog, *,
              clock: Callable[[], float] = time.perf_counter) -> Iterator[NiahEvent]:
    params = run.params
    finished_keys = {cell_key(r) for r in log.done}
    todo = [cell for cell in run.cells if cell.key not in finished_keys]
    yield RunStarted(total=len(run.cells), done=len(run.cells) - len(todo), todo=todo)
    reply = GenerationParams(replace(GREEDY, seed=params.seed), max_tokens=params.answer_tokens)
    for index, cell in enumerate(todo):
        needle = needle_for(cell, params.seed, params.digits)
        prompt = run.builder.build(run.stream, cell, needle)
        yield CellStarted(cell, index, len(prompt.tokens))
        started = clock()
        answer: list[str] = []
        end: Finished | None = None
        for event in generate(engine, Request(prompt.tokens, reply)):
            if isinstance(event, TextChunk):
                answer.append(event.text)
            elif isinstance(event, PrefillProgress):
                yield CellPrefill(cell, event.done, event.total)
            elif isinstance(event, Finished):
                end = event
        if end is None or end.reason == "cancelled":
            return
        text = "".join(answer).strip()
        record = {
            "ctx": cell.ctx, "depth": cell.key[1], "sample": cell.sample, "score": score(text, needle),
            "number": needle.number, "city": needle.city, "answer": text[:200], "answer_tokens": end.completion_tokens,
            "doc_tokens": prompt.doc_tokens, "prompt_tokens": len(prompt.tokens), "needle_at": prompt.needle_at,
            "depth_actual": prompt.depth_actual,
            "reused_tokens": end.reused_tokens, "seconds": round(clock() - started, 3),
            "prefill_tokens_per_s": round(end.prefill_tokens_per_s, 1),
        }
        log.append(record)
        log.done.append(record)
        yield CellDone(cell, record)
