"""The grid: context lengths × depths × samples, and the order that lets consecutive prompts share a prefix."""
from __future__ import annotations

from dataclasses import dataclass

from . import NiahError

# Gradient's published NIAH settings for Llama-3-8B-Instruct-Gradient-1048k (EVAL_* environment variables).
GRADIENT_MIN_CTX = 100
GRADIENT_MAX_CTX = 1_140_200
GRADIENT_CTX_INTERVAL = 86_675
GRADIENT_DEPTH_INTERVAL = 0.2
GRADIENT_SAMPLES = 1
GRADIENT_DIGITS = 8


@dataclass(frozen=True)
class Cell:
    ctx: int
    depth: float
    sample: int

    @property
    def key(self) -> tuple[int, float, int]:
        return (self.ctx, round(self.depth, 6), self.sample)


def context_lengths(min_ctx: int, max_ctx: int, *, interval: int | None = None,
                    steps: int | None = None) -> list[int]:
    """`interval`: min, min+interval, … below max, then max itself. `steps`: that many lengths evenly spaced from
    min to max, both included (1: max alone)."""
    if min_ctx < 1:
        raise NiahError("--min-ctx", f"{min_ctx} must be at least 1")
    if min_ctx > max_ctx:
        raise NiahError("--min-ctx", f"{min_ctx:,} is above --max-ctx {max_ctx:,}")
    if steps is not None:
        if steps < 1:
            raise NiahError("--ctx-steps", f"{steps} must be at least 1")
        if steps == 1:
            return [max_ctx]
        return sorted({round(min_ctx + (max_ctx - min_ctx) * i / (steps - 1)) for i in range(steps)})
    interval = interval or GRADIENT_CTX_INTERVAL
    if interval < 1:
        raise NiahError("--ctx-interval", f"{interval} must be at least 1")
    return [*range(min_ctx, max_ctx, interval), max_ctx]


def depths(interval: float) -> list[float]:
    """0.0, interval, 2·interval, … and 1.0: both ends always included."""
    if not 0.0 < interval <= 1.0:
        raise NiahError("--depth-interval", f"{interval:g} is out of range (above 0.0, at most 1.0)")
    steps = int(1.0 / interval + 1e-9)
    found = [round(i * interval, 6) for i in range(steps + 1) if i * interval < 1.0 - 1e-9]
    return [*found, 1.0]


def grid_cells(contexts: list[int], depth_list: list[float], samples: int) -> list[Cell]:
    """Shortest context first; within one, the deepest needle first, so each prompt's haystack before the needle is
    a prefix of the previous prompt's and the engine's KV cache keeps it."""
    if samples < 1:
        raise NiahError("--samples", f"{samples} must be at least 1")
    return [Cell(ctx, depth, sample) for ctx in sorted(contexts) for depth in sorted(depth_list, reverse=True)
            for sample in range(samples)]
