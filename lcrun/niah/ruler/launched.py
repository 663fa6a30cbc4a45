"""The suite's model on lcrun's own launch and decode loop: `LaunchedModel` (a SuiteModel) opens one engine per KV
type through the launch — each decided before the run starts, so a KV type that cannot fit the longest length is
refused before anything loads — and its `LoopAnswerer` answers through lcrun.generation's one loop: greedy, at most
the task's answer budget, stopping at end-of-generation. The loop keeps what the sequence holds and evaluates only
what a prompt adds to it, so the questions after the first on a shared document prefill their question alone."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from lcrun.engine.protocol import GREEDY
from lcrun.generation.drive import generate
from lcrun.generation.records import Finished, GenerationParams, PrefillProgress, Request, TextChunk
from lcrun.kv_types import KvType
from lcrun.launch.decide import Launch, redecide
from lcrun.launch.loaded import open_model
from lcrun.planner import PlanRefused

from .. import NiahError
from .run import Answer


class LoopAnswerer:
    """Answers on sequence 0 of `engine`: the prefix the sequence holds from the question before is reused."""

    def __init__(self, engine: Any, seed: int = 0) -> None:
        self.engine = engine
        self.params = GenerationParams(replace(GREEDY, seed=seed))

    def answer(self, prompt_tokens: list[int], max_tokens: int, *,
               on_prefill: Callable[[int, int], None] | None = None) -> Answer:
        text: list[str] = []
        end: Finished | None = None
        request = Request(prompt_tokens, replace(self.params, max_tokens=max_tokens))
        for event in generate(self.engine, request):
            if isinstance(event, TextChunk):
                text.append(event.text)
            elif isinstance(event, PrefillProgress):
                if on_prefill is not None:
                    on_prefill(event.done, event.total)
            elif isinstance(event, Finished):
                end = event
        if end is None or end.reason == "cancelled":
            raise KeyboardInterrupt   # the runner keeps every finished cell; this one is lost
        prefilled = end.prompt_tokens - end.reused_tokens
        prefill_seconds = prefilled / end.prefill_tokens_per_s if end.prefill_tokens_per_s > 0 else 0.0
        return Answer("".join(text), prefilled, end.completion_tokens, prefill_seconds)


def suite_launches(launch: Launch, kv_types: Sequence[KvType], n_ctx: int) -> dict[str, Launch]:
    """Each KV type's launch at a context of `n_ctx` (the longest length): planned now, so that one which cannot fit
    is refused before the first grid runs."""
    launches = {}
    for kv in kv_types:
        try:
            launches[kv.label] = redecide(launch, ctx=n_ctx, kv_type=kv.label)
        except PlanRefused as exc:
            raise NiahError("--max-ctx", f"the longest length, {n_ctx:,} tokens, does not fit with KV {kv}: "
                                         f"{exc.problem} (shorter --lengths, or another --kv-type)") from None
    return launches


class LaunchedModel:
    """A SuiteModel: the launch decided for each KV type, opened when the runner comes to it and closed after."""

    def __init__(self, launches: dict[str, Launch], *, seed: int = 0,
                 loading: Callable[[Path], AbstractContextManager[Any]] | None = None) -> None:
        self.launches = launches
        self.seed = seed
        self.loading = loading

    @contextmanager
    def load(self, kv: KvType, n_ctx: int) -> Iterator[LoopAnswerer]:
        launch = self.launches[kv.label]
        if launch.config.n_ctx < n_ctx:
            raise NiahError("--max-ctx", f"KV {kv} was planned for {launch.config.n_ctx:,} tokens, {n_ctx:,} asked")
        with open_model(launch, loading=self.loading) as model:
            yield LoopAnswerer(model.engine, self.seed)
