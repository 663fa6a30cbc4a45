"""What the planner, plan, chat, serve and estimate make of a model file's measured recall (the RULER-style suite's
results, kept by lcrun.recall_store): the effective context measured for the chosen KV type, a one-line warning when
the planned context goes beyond it, with the fix, and the context `--ctx effective` plans. Pure functions of the
stored results and the plan; whether a context fits is the caller's `fits(ctx, kv)`."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .kv_types import KvType, least_lossy_first

Fits = Callable[[int, KvType], bool]
_STEP = 256  # llama.cpp pads contexts to 256 cells


@dataclass(frozen=True)
class KvRecall:
    """One KV type's measurement. effective_context: None = not measured at the shortest length; 0 = failed there."""
    kv: KvType
    effective_context: int | None
    first_failing: int | None        # the first length scoring below the threshold; None: none failed
    longest_measured: int | None
    threshold: float
    length_scores: dict[int, float]  # the suite score (percent) of each length measured in full


@dataclass(frozen=True)
class StoredRecall:
    fingerprint: str
    model: str
    by_kv: dict[str, KvRecall]       # by KvType.label

    def get(self, kv: KvType) -> KvRecall | None:
        return self.by_kv.get(kv.label)


@dataclass(frozen=True)
class RecallAdvice:
    kv: KvType
    planned_ctx: int
    measured: KvRecall | None        # for the chosen KV type
    warning: str | None              # one line: the plan goes beyond what was measured good, and the fix
    suggestion: tuple[int, KvType] | None

    @property
    def note(self) -> str:
        """What a plan view shows beside the context it plans."""
        m = self.measured
        if m is None or m.effective_context is None:
            return f"recall not measured with {self.kv} KV (lcrun niah MODEL --suite ruler measures it)"
        if m.effective_context == 0:
            return f"measured recall below {m.threshold:g} already at {ctx_label(m.first_failing or 0)} with {self.kv} KV"
        more = "" if m.first_failing else " (no measured length failed)"
        return (f"measured effective context {ctx_label(m.effective_context)} with {self.kv} KV (suite score "
                f"≥ {m.threshold:g}){more}")


def ctx_label(n: int) -> str:
    if n and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n and n % 1024 == 0:
        return f"{n >> 10}K"
    return f"{n:,}"


def ctx_flag(n: int) -> str:
    """As `-c` takes it: 48k, 1M, or the number."""
    if n and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}k" if n and n % 1024 == 0 else str(n)


def _largest_fitting(limit: int, kv: KvType, fits: Fits | None) -> int:
    """The largest context up to `limit` that fits (`limit` itself, or a multiple of 256 below it); 0 if none."""
    if fits is None or fits(limit, kv):
        return limit
    lo, hi = 0, (limit - 1) // _STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * _STEP, kv):
            lo = mid
        else:
            hi = mid - 1
    return lo * _STEP


def _good(recall: KvRecall) -> int:
    return recall.effective_context or 0


def best_measured(recall: StoredRecall | None, *, limit: int | None = None, fits: Fits | None = None,
                  kv_types: Sequence[KvType] | None = None) -> tuple[int, KvType] | None:
    """The longest context measured good (up to `limit`) that fits, over the measured KV types (or `kv_types`);
    between equal contexts the least lossy type. `--ctx effective` plans this."""
    if recall is None:
        return None
    allowed = {kv.label for kv in kv_types} if kv_types is not None else None
    candidates = least_lossy_first([m.kv for m in recall.by_kv.values()
                                    if _good(m) > 0 and (allowed is None or m.kv.label in allowed)])
    best: tuple[int, KvType] | None = None
    for kv in candidates:
        good = _good(recall.by_kv[kv.label])
        ctx = _largest_fitting(min(good, limit) if limit else good, kv, fits)
        if ctx > 0 and (best is None or ctx > best[0]):
            best = (ctx, kv)
    return best


def advise(recall: StoredRecall | None, planned_ctx: int, kv: KvType, *, fits: Fits | None = None) -> RecallAdvice:
    """The measured effective context for `kv`, and when `planned_ctx` goes beyond it, the warning:
    "planned 128K with q4_0 KV; measured recall falls below 85.6 beyond 24K with q4_0 and beyond 48K with q8_0 —
    try -ctk q8_0 -ctv q8_0 -c 48k". No warning where this KV type was never measured."""
    measured = recall.get(kv) if recall else None
    if measured is None or measured.effective_context is None or planned_ctx <= measured.effective_context:
        return RecallAdvice(kv, planned_ctx, measured, None, None)
    suggestion = best_measured(recall, limit=planned_ctx, fits=fits)
    if measured.first_failing is None:
        what = (f"recall measured good only up to {ctx_label(measured.effective_context)} with {kv} "
                f"(the longest length measured)")
    elif measured.effective_context == 0:
        what = (f"measured recall falls below {measured.threshold:g} already at "
                f"{ctx_label(measured.first_failing)} with {kv}")
    else:
        what = (f"measured recall falls below {measured.threshold:g} beyond {ctx_label(measured.effective_context)} "
                f"with {kv}")
    fix = ""
    if suggestion is not None:
        ctx, better = suggestion
        if better != kv:
            other = recall.get(better) if recall else None
            assert other is not None
            what += (f" and beyond {ctx_label(_good(other))} with {better}" if other.first_failing else
                     f", good up to {ctx_label(_good(other))} with {better}")
            fix = f" — try {better.flags} -c {ctx_flag(ctx)}"
        else:
            fix = f" — try -c {ctx_flag(ctx)}"
    return RecallAdvice(kv, planned_ctx, measured,
                        f"planned {ctx_label(planned_ctx)} with {kv} KV; {what}{fix}", suggestion)
