"""The run's summary: mean score per (depth, context) — the heatmap's numbers — and per row, column and overall.
One JSON-ready dict feeds the terminal heatmap, the picture and `--json`."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lcrun.atomic_files import write_atomic

from .run import NiahRun, cell_key


def _mean(scores: list[int]) -> float | None:
    return round(sum(scores) / len(scores), 4) if scores else None


def summarize(run: NiahRun, records: Iterable[dict[str, Any]], *, model: str, results: Path,
              settings: dict[str, Any]) -> dict[str, Any]:
    wanted = {cell.key for cell in run.cells}
    by_key = {cell_key(r): int(r["score"]) for r in records if cell_key(r) in wanted}
    cells: dict[tuple[int, float], list[int]] = {}
    for (ctx, depth, _sample), value in by_key.items():
        cells.setdefault((ctx, depth), []).append(value)
    depths = [round(d, 6) for d in run.depths]
    stream, params = run.stream, run.params
    return {
        "model": model,
        "results": str(results),
        "parameters": {"min_ctx": params.min_ctx, "max_ctx": params.max_ctx, "max_ctx_fitted": run.max_ctx,
                       "ctx_interval": params.ctx_interval, "ctx_steps": params.ctx_steps,
                       "depth_interval": params.depth_interval, "samples": params.samples, "digits": params.digits,
                       "seed": params.seed},
        "engine": {"n_ctx": run.n_ctx, **settings},
        "haystack": {"path": str(run.haystack.path), "sha256": run.haystack.sha256,
                     "file_tokens": stream.file_tokens, "repeated": stream.copies > 1, "copies": stream.copies},
        "contexts": run.contexts,
        "depths": depths,
        "cells_done": len(by_key),
        "cells_total": len(wanted),
        "complete": len(by_key) == len(wanted),
        "score": _mean(list(by_key.values())),
        "context_scores": [_mean([v for (c, _d), vs in cells.items() if c == ctx for v in vs]) for ctx in run.contexts],
        "depth_scores": [_mean([v for (_c, d), vs in cells.items() if d == depth for v in vs]) for depth in depths],
        "scores": [[_mean(cells.get((ctx, depth), [])) for ctx in run.contexts] for depth in depths],
        "notes": list(run.notes),
    }


def summary_path(results: Path) -> Path:
    return results.with_name(results.stem + ".summary.json")


def write_summary(summary: dict[str, Any], path: Path) -> None:
    write_atomic(path, json.dumps(summary, indent=2) + "\n")
