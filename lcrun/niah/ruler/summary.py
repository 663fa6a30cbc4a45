"""The suite's summary: per KV type, the score of each task at each length (RULER's scale: percent), the suite
score per length (the mean over the tasks) and the effective context. One JSON-ready dict feeds the heatmaps,
`--json` and the results store.

Effective context, as RULER defines it: the longest length whose suite score is at least the threshold (85.6,
Llama-2-7B's score at 4K) with every shorter length passing too. A length counts once all its cells are done;
lengths past one not yet complete are not counted."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lcrun.kv_types import KvType
from lcrun.recall_advice import ctx_label

from .grid import SuiteCell
from .run import Suite, cell_key
from .tasks import PROMPT_FORMAT, TASKS, THRESHOLD


def _mean(values: Sequence[float]) -> float | None:
    return round(100 * sum(values) / len(values), 2) if values else None


def effective_context(lengths: Sequence[int], length_scores: Sequence[float | None],
                      threshold: float = THRESHOLD) -> tuple[int | None, int | None]:
    """(the effective context, the first length that fails). Effective None: the shortest length is not measured;
    0: the shortest length fails already."""
    effective: int | None = None
    for ctx, value in sorted(zip(lengths, length_scores)):
        if value is None:
            break
        if value < threshold:
            return effective or 0, ctx
        effective = ctx
    return effective, None


def summarize_kv(kv: KvType, cells: Sequence[SuiteCell], records: dict[tuple, dict[str, Any]],
                 lengths: Sequence[int], tasks: Sequence[str], threshold: float = THRESHOLD) -> dict[str, Any]:
    mine = [c for c in cells if c.kv == kv.label]
    scores: dict[str, list[float | None]] = {}
    length_scores: list[float | None] = []
    for ctx in lengths:
        task_means: list[float] = []
        for task in tasks:
            at = [c for c in mine if c.ctx == ctx and c.task == task]
            got = [float(records[c.key]["score"]) for c in at if c.key in records]
            scores.setdefault(task, []).append(_mean(got))
            if got and len(got) == len(at):
                task_means.append(sum(got) / len(got))
        whole = len(task_means) == len(tasks)     # a length scores once every cell of it is done
        length_scores.append(round(100 * sum(task_means) / len(task_means), 2) if whole else None)
    effective, failing = effective_context(lengths, length_scores, threshold)
    measured = [ctx for ctx, value in zip(lengths, length_scores) if value is not None]
    done = [records[c.key] for c in mine if c.key in records]
    return {"kv": kv.label, "type_k": kv.type_k, "type_v": kv.type_v, "scores": scores,
            "length_scores": length_scores, "effective_context": effective, "first_failing": failing,
            "longest_measured": max(measured) if measured else None,
            "cells_done": len(done), "cells_total": len(mine),
            "prompt_tokens": sum(int(r["prompt_tokens"]) for r in done),
            "prefilled_tokens": sum(int(r["prefilled_tokens"]) for r in done)}


def summary_line(kv_summaries: Iterable[dict[str, Any]], threshold: float = THRESHOLD) -> str:
    """"effective context: 32K with f16 KV, 24K with q8_0/q4_0, 8K with q4_0 (threshold 85.6)"."""
    parts = []
    for n, entry in enumerate(kv_summaries):
        effective, failing, kv = entry["effective_context"], entry["first_failing"], entry["kv"]
        with_kv = f"with {kv} KV" if n == 0 else f"with {kv}"
        if effective is None:
            parts.append(f"not measured {with_kv}")
        elif effective == 0:
            parts.append(f"below {ctx_label(failing)} {with_kv}")
        elif failing is None:
            parts.append(f"≥{ctx_label(effective)} {with_kv} (no measured length failed)")
        else:
            parts.append(f"{ctx_label(effective)} {with_kv}")
    return f"effective context: {', '.join(parts)} (threshold {threshold:g})"


def summarize(suite: Suite, records: Iterable[dict[str, Any]], *, model: str, results: str,
              settings: dict[str, Any]) -> dict[str, Any]:
    params = suite.params
    wanted = {cell.key for cell in suite.cells}
    by_key = {cell_key(r): r for r in records if cell_key(r) in wanted}
    lengths = sorted(set(params.lengths))
    tasks = [t for t in TASKS if t in params.tasks]
    kv_summaries = [summarize_kv(kv, suite.cells, by_key, lengths, tasks) for kv in params.kv_types]
    prompt_tokens = sum(e["prompt_tokens"] for e in kv_summaries)
    prefilled = sum(e["prefilled_tokens"] for e in kv_summaries)
    return {
        "suite": "ruler", "model": model, "results": results, "threshold": THRESHOLD,
        "prompt_format": PROMPT_FORMAT, "seed": params.seed, "samples": params.samples,
        "lengths": lengths, "tasks": tasks, "settings": settings,
        "kv_types": kv_summaries,
        "prefill": {"prompt_tokens": prompt_tokens, "prefilled_tokens": prefilled,
                    "saved": round(prompt_tokens / prefilled, 2) if prefilled else None},
        "cells_done": len(by_key), "cells_total": len(wanted), "complete": len(by_key) == len(wanted),
        "line": summary_line(kv_summaries),
        "notes": list(suite.notes),
    }
