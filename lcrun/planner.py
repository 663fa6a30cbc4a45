"""The planner: from a model, the machine and the user's constraints, choose context length, KV type, flash attention
and GPU layers — and refuse, before anything is loaded, a plan that cannot fit, saying what would make it fit."""
from __future__ import annotations

from dataclasses import dataclass

from .devices import Device
from .errors import LcrunError
from .estimate import CTX_STEP, GIB, MemoryEstimate, largest_fitting_ctx, estimate_memory
from .memory_model import parse_kv_type, validate_kv
from .model_spec import ModelSpec

KV_LADDER = ("f16", "q8_0", "q4_0")  # least lossy first


@dataclass
class Choice:
    """The planner's decision for a run: the settings chosen, with their memory estimate, and why."""
    estimate: MemoryEstimate
    why: str                      # which constraint binds, in words


class PlanRefused(LcrunError):
    """No setting fits; the message says what would."""


def _kv_candidates(spec: ModelSpec, kv_type: str | None, flash_attn: bool) -> list[tuple[str, str]]:
    from .estimate import model_shape

    if kv_type:
        return [parse_kv_type(kv_type)]
    shape = model_shape(spec)
    legal = []
    for kv in KV_LADDER:
        try:
            validate_kv(shape, kv, kv, flash_attn)
            legal.append((kv, kv))
        except ValueError:
            continue
    return legal or [("f16", "f16")]


def _prefer_fast_attention(estimate: MemoryEstimate, spec: ModelSpec, quant: str, devices: list[Device],
                           flash_attn: str, options: dict) -> tuple[MemoryEstimate, str]:
    """With flash attention left to us, a run entirely on the CPU takes it off when its larger compute buffer fits:
    llama.cpp's CPU flash-attention path generates several times slower at depth (5.6× at 16K tokens in
    docs/performance.md). A quantized V cache needs flash attention; GPUs keep it (their kernels are fast)."""
    if flash_attn != "auto" or estimate.n_gpu_layers or estimate.type_v not in ("f16", "f32", "bf16"):
        return estimate, ""
    without = estimate_memory(spec, quant, estimate.ctx, devices, type_k=estimate.type_k,
                              type_v=estimate.type_v, **{**options, "flash_attn": False})
    if not without.fits:
        return estimate, ""
    return without, "; flash attention off: faster generation on CPU, and its larger compute buffer fits"


def _what_is_missing(estimate: MemoryEstimate, devices: list[Device]) -> str:
    """How much memory the estimate lacks over all hosts together, and how to plan for it (another worker)."""
    hosts = {d.host for d in devices}
    if estimate.shortfall_bytes:
        more = -(-estimate.shortfall_bytes // GIB)
        where = f" over the {len(hosts)} hosts" if len(hosts) > 1 else ""
        return (f" ({more:,} GiB more memory is needed{where}: e.g. another worker, planned with --rpc-mem "
                f"HOST={more}G)")
    if len(hosts) > 1:
        return " (the hosts hold enough together, but not split by whole layers; free some memory on the one named)"
    return ""


def choose(spec: ModelSpec, quant: str, devices: list[Device], *, ctx: int | None = None, kv_type: str | None = None,
           flash_attn: str = "auto", n_gpu_layers: int | None = None, n_ubatch: int = 512, n_seq: int = 1) -> Choice:
    """ctx None = the largest multiple of 256 that fits, capped at the model's maximum; kv_type None = the least
    lossy of f16 → q8_0 → q4_0 that reaches the context; flash attention "auto": on (it never costs memory), except
    on an all-CPU run with an f16 cache when turning it off fits (faster generation there)."""
    fa = flash_attn != "off"
    target = ctx or spec.n_ctx_train
    options = dict(flash_attn=fa, n_ubatch=n_ubatch, n_seq=n_seq, n_gpu_layers=n_gpu_layers)
    best: tuple[int, tuple[str, str]] | None = None
    candidates = _kv_candidates(spec, kv_type, fa)
    for type_k, type_v in candidates:
        try:
            estimate = estimate_memory(spec, quant, target, devices, type_k=type_k, type_v=type_v, **options)
        except ValueError as exc:
            raise PlanRefused(spec.name, str(exc)) from None
        if estimate.fits:
            limit = "the model's maximum context" if target == spec.n_ctx_train and ctx is None else "the requested context"
            kv_note = "" if (type_k, type_v) == candidates[0] else (
                f"; KV {type_k} because less compressed types do not reach it")
            estimate, fa_note = _prefer_fast_attention(estimate, spec, quant, devices, flash_attn, options)
            return Choice(estimate, f"fits at {limit} ({target:,} tokens){kv_note}{fa_note}")
        reach = largest_fitting_ctx(spec, quant, devices, max_ctx=target, type_k=type_k, type_v=type_v, **options)
        if best is None or reach > best[0]:
            best = (reach, (type_k, type_v))
    assert best is not None
    reach, (type_k, type_v) = best
    at_target = estimate_memory(spec, quant, target, devices, type_k=type_k, type_v=type_v, **options)
    if ctx is not None or reach == 0:
        fix = (f"use --ctx {reach:,} or less (the largest that fits with KV {type_k})" if reach else
               "use a smaller quant, fewer parallel sequences, or more memory")
        raise PlanRefused(spec.name, f"{target:,} tokens do not fit: {at_target.binding}; {fix}"
                                     f"{_what_is_missing(at_target, devices)}")
    estimate = estimate_memory(spec, quant, reach, devices, type_k=type_k, type_v=type_v, **options)
    beyond = estimate_memory(spec, quant, reach + CTX_STEP, devices, type_k=type_k, type_v=type_v, **options)
    kv_gib = at_target.kv_bytes / GIB
    return Choice(estimate, f"context limited to {reach:,} of {target:,} tokens by memory: {beyond.binding} "
                        f"(the full context needs {kv_gib:.1f} GiB of KV {type_k})")
