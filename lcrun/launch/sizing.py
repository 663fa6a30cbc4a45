"""The context of a run whose prompt is known before loading (a chat with documents): `--ctx auto` — the default when
no -c is given — sizes it to the prompt plus a reserve (the answer, or the conversation), within what fits this
machine; a context that cannot hold them is refused before anything loads, in one line with the estimator's fix
(lcrun.context_fit). Never a silent truncation."""
from __future__ import annotations

from dataclasses import dataclass, replace

from lcrun.context_fit import ContextFit, ctx_flag, fit_context
from lcrun.errors import LcrunError
from lcrun.memory_model import parse_kv_type

from .decide import Launch, no_larger_than_needed


class PromptDoesNotFit(LcrunError):
    """The documents (and the prompt) with the reserve do not fit the context asked for, memory or the model."""


@dataclass(frozen=True)
class Sized:
    launch: Launch
    fit: ContextFit
    how: str                   # how the context was chosen, in words (for the documents' table)


def size_to_prompt(launch: Launch, tokens: int, reserve: int, *, subject: str, reserve_for: str = "the answer",
                   keep_ctx: int | None = None) -> Sized:
    """The launch for a prompt of `tokens` with `reserve` more kept free. With -c: the launch as it is when they fit
    it, else a refusal with the fix. Without: the smallest context (whole K) that holds them, the least lossy KV
    type that reaches it (the planner's choice at that context) — or `keep_ctx` (a restored session's context, so
    its KV cache loads) when that holds them too. `subject` names what is too long in a refusal."""
    options, spec, planned = launch.options, launch.spec, launch.choice.estimate
    fit = fit_context(spec, spec.file_type or "file", launch.devices, tokens, reserve=reserve,
                      kv_types=[parse_kv_type(options.kv_type)] if options.kv_type else None,
                      planned_ctx=planned.ctx if options.ctx is not None else None,
                      planned_kv=(planned.type_k, planned.type_v), flash_attn=options.flash_attn != "off",
                      n_ubatch=options.ubatch, n_seq=options.n_seq, n_gpu_layers=options.gpu_layers,
                      reserve_for=reserve_for)
    need = tokens + reserve
    if options.ctx is not None:
        if need <= planned.ctx // options.n_seq:
            return Sized(launch, fit, f"-c {ctx_flag(planned.ctx)}")
        raise PromptDoesNotFit(subject, f"does not fit -c {ctx_flag(planned.ctx)}: {fit.fix()}")
    if keep_ctx is not None and need <= keep_ctx <= planned.ctx:
        kept = no_larger_than_needed(launch, keep_ctx)
        return Sized(_why(kept, f"the --session's context ({keep_ctx:,} tokens), so its KV cache loads"), fit,
                     "--session's context")
    if not fit.fits:
        raise PromptDoesNotFit(subject, fit.fix())
    sized = no_larger_than_needed(launch, fit.needed_ctx)
    return Sized(_why(sized, f"sized to the prompt ({tokens:,} tokens + {reserve:,} for {reserve_for}; --ctx auto)"),
                 fit, "--ctx auto")


def _why(launch: Launch, why: str) -> Launch:
    choice = launch.choice
    kv = choice.why.partition("; ")[2]   # what the planner added (a lossier KV type, flash attention off)
    return replace(launch, choice=replace(choice, why=why + (f"; {kv}" if kv else "")))


def fix_for(launch: Launch, tokens: int, reserve: int, reserve_for: str = "the answer") -> str:
    """The estimator's one line for a prompt of `tokens` on this launch's model and machine: the context it needs,
    the memory per KV type, and the flags that fit (for a running chat, the command to start again with)."""
    options, spec = launch.options, launch.spec
    return fit_context(spec, spec.file_type or "file", launch.devices, tokens, reserve=reserve,
                       kv_types=[parse_kv_type(options.kv_type)] if options.kv_type else None,
                       flash_attn=options.flash_attn != "off", n_ubatch=options.ubatch, n_seq=options.n_seq,
                       n_gpu_layers=options.gpu_layers, reserve_for=reserve_for).fix()
