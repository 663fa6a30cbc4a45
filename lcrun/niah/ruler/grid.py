"""The grid: KV types × context lengths × samples × tasks, and the order that shares documents: within one KV type
(one engine), lengths from the shortest, and within a (length, sample) the five essay tasks back to back, so each
question after the first finds the document in the engine's cache."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lcrun.kv_types import KvType

from .. import NiahError
from .tasks import TASKS

RULER_MIN_CTX = 4096     # RULER's shortest length, where its threshold was taken
_ROUND = 256             # llama.cpp pads contexts to 256 cells


@dataclass(frozen=True)
class SuiteCell:
    kv: str       # KvType.label
    ctx: int
    task: str
    sample: int

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.kv, self.ctx, self.task, self.sample)


def length_ladder(max_ctx: int, *, min_ctx: int = RULER_MIN_CTX, per_octave: int = 1) -> list[int]:
    """RULER's lengths (4K, 8K, 16K, … doubling) up to `max_ctx`, which ends the ladder; `per_octave` > 1 puts
    evenly spaced lengths inside each doubling (2: 4K, 6K, 8K, 12K, 16K, 24K, …)."""
    if min_ctx < 1:
        raise NiahError("--min-ctx", f"{min_ctx} must be at least 1")
    if per_octave < 1:
        raise NiahError("--per-octave", f"{per_octave} must be at least 1")
    if max_ctx < min_ctx:
        raise NiahError("--max-ctx", f"{max_ctx:,} is below the shortest length {min_ctx:,}")
    lengths: list[int] = []
    octave = min_ctx
    while octave < max_ctx:
        for k in range(per_octave):
            ctx = octave + round(octave * k / per_octave / _ROUND) * _ROUND
            if ctx < max_ctx and (not lengths or ctx > lengths[-1]):
                lengths.append(ctx)
        octave *= 2
    return [*lengths, max_ctx]


def suite_cells(kv_types: Sequence[KvType], lengths: Sequence[int], tasks: Sequence[str],
                samples: int) -> list[SuiteCell]:
    if samples < 1:
        raise NiahError("--samples", f"{samples} must be at least 1")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise NiahError("--tasks", f"unknown task {unknown[0]!r}; the tasks are {', '.join(TASKS)}")
    if not tasks:
        raise NiahError("--tasks", "no task chosen")
    if len({kv.label for kv in kv_types}) != len(kv_types) or not kv_types:
        raise NiahError("--kv-type", "give each KV type once, and at least one")
    ordered = [t for t in TASKS if t in tasks]
    return [SuiteCell(kv.label, ctx, task, sample) for kv in kv_types for ctx in sorted(set(lengths))
            for sample in range(samples) for task in ordered]
