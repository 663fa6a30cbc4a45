"""Does a document fit? From its token count, the context it needs (the document and a reserve for the answer),
the memory that context takes per KV cache type, whether that fits this machine and the model's maximum context —
and, when it does not fit as planned, the one-line fix with the flags that make it fit. Pure: the estimator's plans,
no model loaded, no network (chat, `estimate --file` and `read` all ask it the same question)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .devices import Device
from .estimate import GIB, MemoryEstimate, estimate_memory, largest_fitting_ctx
from .model_spec import ModelSpec
from .planner import kv_candidates

ANSWER_RESERVE = 1024  # tokens kept for the answer: the chat's default reply budget
CTX_ROUND = 1024       # contexts are asked for in whole K (-c 160k), never below what is needed


def ctx_flag(ctx: int) -> str:
    """How `-c` spells a context: 160k where it is whole K, else the number."""
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def needed_context(tokens: int, reserve: int, max_ctx: int) -> int:
    """tokens + reserve, rounded up to whole K — but not past the model's maximum when the need itself is within it."""
    need = tokens + reserve
    rounded = -(-need // CTX_ROUND) * CTX_ROUND
    return max_ctx if need <= max_ctx < rounded else rounded


def kv_label(type_k: str, type_v: str) -> str:
    return type_k if type_k == type_v else f"{type_k}/{type_v}"


def kv_flags(type_k: str, type_v: str) -> str:
    return f"-ctk {type_k} -ctv {type_v}"


@dataclass(frozen=True)
class KvFit:
    type_k: str
    type_v: str
    estimate: MemoryEstimate       # at the needed context

    @property
    def fits(self) -> bool:
        return self.estimate.fits

    def to_dict(self) -> dict[str, Any]:
        return {"kv_type": kv_label(self.type_k, self.type_v), "total_bytes": self.estimate.total_bytes,
                "kv_bytes": self.estimate.kv_bytes, "fits": self.fits, "binding": self.estimate.binding}


@dataclass(frozen=True)
class ContextFit:
    model: str
    quant: str
    tokens: int                    # the documents' (and any prompt's) tokens
    reserve: int                   # kept for the answer
    needed_ctx: int                # the context to ask for
    max_ctx: int                   # the model's maximum (trained) context
    options: tuple[KvFit, ...]     # per KV cache type, least lossy first
    planned_ctx: int | None = None         # the context a run already planned (chat), if any
    planned_kv: tuple[str, str] | None = None
    largest: tuple[int, str, str] | None = None  # when nothing fits: the largest context that does, and its KV
    reserve_for: str = "the answer"        # what the reserve is kept for, in words

    @property
    def exceeds_model(self) -> bool:
        return self.tokens + self.reserve > self.max_ctx

    @property
    def best(self) -> KvFit | None:
        """The least lossy KV type whose plan fits."""
        return next((o for o in self.options if o.fits), None)

    @property
    def fits_as_planned(self) -> bool:
        return self.planned_ctx is not None and self.tokens + self.reserve <= self.planned_ctx

    @property
    def fits(self) -> bool:
        return not self.exceeds_model and (self.fits_as_planned or self.best is not None)

    def fix(self) -> str:
        """One line: what the document needs, what each KV type takes, and the flags that make it fit (or why
        nothing does), e.g. "needs -c 160k: 19.6 GiB with f16 KV, 10.4 GiB with q8_0 — fits with -ctk q8_0
        -ctv q8_0"."""
        need = (f"needs -c {ctx_flag(self.needed_ctx)} ({self.tokens:,} tokens + {self.reserve:,} for "
                f"{self.reserve_for})")
        if self.exceeds_model:
            return (f"{need}: more than the model's maximum context of {ctx_flag(self.max_ctx)} "
                    f"({self.max_ctx:,}); give a part of it")
        shown: list[str] = []
        for i, option in enumerate(self.options):
            kv = f"{kv_label(option.type_k, option.type_v)} KV" if i == 0 else kv_label(option.type_k, option.type_v)
            shown.append(f"{option.estimate.total_bytes / GIB:.1f} GiB with {kv}")
            if option.fits:
                break
        head = f"{need}: {', '.join(shown)}"
        best = self.best
        if best is None:
            tail = "does not fit the memory here"
            if self.largest and self.largest[0]:
                ctx, k, v = self.largest
                tail += f" (the largest that fits is -c {ctx_flag(ctx)} with {kv_flags(k, v)})"
            return f"{head} — {tail}; use a smaller quant or more memory, or give a part of the document"
        if best is self.options[0]:
            flags = f"-c {ctx_flag(self.needed_ctx)}"
        else:
            flags = f"-c {ctx_flag(self.needed_ctx)} {kv_flags(best.type_k, best.type_v)}"
        return f"{head} — fits with {flags}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "quant": self.quant, "tokens": self.tokens, "reserve": self.reserve,
                "needed_ctx": self.needed_ctx, "max_ctx": self.max_ctx, "exceeds_model": self.exceeds_model,
                "fits": self.fits, "planned_ctx": self.planned_ctx,
                "kv_types": [o.to_dict() for o in self.options],
                "best_kv_type": kv_label(self.best.type_k, self.best.type_v) if self.best else None,
                "largest_fitting": ({"ctx": self.largest[0], "kv_type": kv_label(*self.largest[1:])}
                                    if self.largest else None),
                "fix": self.fix()}


def fit_context(spec: ModelSpec, quant: str, devices: list[Device], tokens: int, *, reserve: int = ANSWER_RESERVE,
                kv_types: Sequence[tuple[str, str]] | None = None, planned_ctx: int | None = None,
                planned_kv: tuple[str, str] | None = None, flash_attn: bool = True, n_ubatch: int = 512,
                n_seq: int = 1, n_gpu_layers: int | None = None, reserve_for: str = "the answer") -> ContextFit:
    """Whether `tokens` (the documents as they enter the context) and `reserve` fit `spec` at `quant` on
    `devices`: the plans at the needed context for each KV type (`kv_types`, or the planner's ladder f16 → q8_0 →
    q4_0 that this model allows), least lossy first. `planned_ctx`/`planned_kv`: what a run has already planned,
    so the answer can say that it fits as it is."""
    needed = needed_context(tokens, reserve, spec.n_ctx_train)
    options = dict(flash_attn=flash_attn, n_ubatch=n_ubatch, n_seq=n_seq, n_gpu_layers=n_gpu_layers)
    ladder = list(kv_types) if kv_types else kv_candidates(spec, None, flash_attn)
    if tokens + reserve > spec.n_ctx_train:
        return ContextFit(spec.name, quant.upper(), tokens, reserve, needed, spec.n_ctx_train, (), planned_ctx,
                          planned_kv, reserve_for=reserve_for)
    fits = tuple(KvFit(k, v, estimate_memory(spec, quant, needed, devices, type_k=k, type_v=v, **options))
                 for k, v in ladder)
    largest = None
    if not any(f.fits for f in fits):
        k, v = ladder[-1]
        largest = (largest_fitting_ctx(spec, quant, devices, max_ctx=needed, type_k=k, type_v=v, **options), k, v)
    return ContextFit(spec.name, quant.upper(), tokens, reserve, needed, spec.n_ctx_train, fits, planned_ctx,
                      planned_kv, largest, reserve_for)
