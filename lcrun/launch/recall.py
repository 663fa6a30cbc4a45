"""What a launch makes of the file's measured recall (the RULER-style suite's results, lcrun.recall_store): the
context `--ctx effective` plans — the longest context measured good that fits, over the KV types measured — and
the advice a plan shows beside the context it planned (lcrun.recall_advice.advise: the measured effective context
for the chosen KV type, or the one-line warning with its fix). `plan` (which plans without a launch) uses the same
functions, so `plan`, `chat`, `serve` and `niah` agree."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lcrun.devices import Device
from lcrun.errors import LcrunError
from lcrun.estimate import estimate_memory
from lcrun.kv_types import KvType
from lcrun.model_spec import ModelSpec
from lcrun.recall_advice import Fits, RecallAdvice, StoredRecall, advise, best_measured, ctx_label
from lcrun.recall_store import RecallStoreError, measured_for

NOT_MEASURED = "no measured recall is stored for this file: run lcrun niah FILE --suite ruler first"


@dataclass(frozen=True)
class Machine:
    """What a context must fit: the model on these devices with these settings (those of the planner's `choose`)."""
    spec: ModelSpec
    quant: str
    devices: list[Device]
    flash_attn: bool = True
    n_ubatch: int = 512
    n_seq: int = 1
    n_gpu_layers: int | None = None

    def fits(self) -> Fits:
        """fits(ctx, kv) for one sequence's context: the n_seq sequences together must fit."""
        def fits(ctx: int, kv: KvType) -> bool:
            try:
                return estimate_memory(self.spec, self.quant, ctx * self.n_seq, self.devices, type_k=kv.type_k,
                                       type_v=kv.type_v, flash_attn=self.flash_attn, n_ubatch=self.n_ubatch,
                                       n_seq=self.n_seq, n_gpu_layers=self.n_gpu_layers).fits
            except ValueError:   # a KV type this model or these settings cannot have (a quantized V without FA)
                return False
        return fits


def stored_recall(model_path: Path) -> tuple[StoredRecall | None, str | None]:
    """(the file's stored results or None, a warning when the store cannot be read): a damaged store never stops
    a run, it only loses its advice."""
    try:
        return measured_for(model_path), None
    except RecallStoreError as exc:
        return None, f"measured recall not shown: {exc}"
    except LcrunError:
        return None, None    # the file cannot be fingerprinted: its own open says why


def effective_context(model_path: Path, machine: Machine, kv_type: str | None) -> tuple[int, KvType, str]:
    """`--ctx effective`: (the whole context to plan, its KV type, why) — the longest context measured good that
    fits, per sequence times n_seq; with `kv_type` given, among that type's measurements only."""
    recall, problem = stored_recall(model_path)
    if problem:
        raise LcrunError(str(model_path), problem.removeprefix("measured recall not shown: "))
    if recall is None:
        raise LcrunError(str(model_path), NOT_MEASURED)
    allowed = [KvType.parse(kv_type)] if kv_type else None
    if allowed and recall.get(allowed[0]) is None:
        measured = ", ".join(sorted(recall.by_kv)) or "none"
        raise LcrunError(str(model_path), f"--ctx effective: recall was not measured with {allowed[0]} KV "
                                          f"(measured: {measured}); run lcrun niah FILE --suite ruler --kv-type "
                                          f"{allowed[0]} first")
    considered = [recall.by_kv[kv.label] for kv in allowed] if allowed else list(recall.by_kv.values())
    if not any(m.effective_context for m in considered):
        failed = ", ".join(f"{ctx_label(m.first_failing)} with {m.kv}" for m in considered if m.first_failing)
        raise LcrunError(str(model_path), f"--ctx effective: measured recall is below the threshold already at the "
                                          f"shortest length ({failed or 'none measured in full'}): nothing measured "
                                          "good to plan (measure shorter --lengths, or give --ctx)")
    best = best_measured(recall, limit=machine.spec.n_ctx_train, fits=machine.fits(), kv_types=allowed)
    if best is None:
        raise LcrunError(str(model_path), "--ctx effective: no context measured good fits this machine (even the "
                                          "shortest; give --ctx, or plan with --ram/--gpu-mem)")
    ctx, kv = best
    good = recall.by_kv[kv.label].effective_context or 0
    why = (f"--ctx effective: {ctx_label(good)} measured good with {kv} KV"
           + ("" if ctx == good else f", {ctx_label(ctx)} of it fits here"))
    return ctx * machine.n_seq, kv, why


def plan_advice(model_path: Path, machine: Machine, ctx: int, kv: KvType) -> tuple[RecallAdvice | None, str | None]:
    """(the advice for a plan of `ctx` tokens in all with `kv` — None when nothing is stored for the file —, a
    warning when the store cannot be read). The advice compares one sequence's context (ctx / n_seq)."""
    recall, problem = stored_recall(model_path)
    if recall is None:
        return None, problem
    return advise(recall, ctx // machine.n_seq, kv, fits=machine.fits()), None
