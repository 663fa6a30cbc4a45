"""What `plan`, `estimate` and `models` report of recall, as JSON-ready dicts: the figures measured on a local file
(lcrun niah --suite ruler, kept by lcrun.recall_store), the advice for a planned context (lcrun.recall_advice), and
RULER's published figures for the built-in profiles (lcrun.models)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lcrun.models import PublishedRecall, published_recall

from .devices import Device
from .kv_types import KvType
from .launch.recall import Machine, stored_recall
from .model_spec import ModelSpec
from .niah.ruler.tasks import THRESHOLD
from .recall_advice import KvRecall, RecallAdvice, StoredRecall, advise


def measured_json(recall: KvRecall) -> dict[str, Any]:
    return {"kv": recall.kv.label, "effective_context": recall.effective_context,
            "first_failing": recall.first_failing, "longest_measured": recall.longest_measured,
            "threshold": recall.threshold, "length_scores": {str(k): v for k, v in sorted(recall.length_scores.items())}}


def stored_json(recall: StoredRecall) -> dict[str, Any]:
    """Every KV type measured on the file."""
    return {"fingerprint": recall.fingerprint, "model": recall.model,
            "kv_types": [measured_json(m) for _label, m in sorted(recall.by_kv.items())]}


def advice_json(advice: RecallAdvice) -> dict[str, Any]:
    """The advice for one planned context: what was measured for its KV type, the warning and its fix (None when
    the plan stays within what was measured good)."""
    suggestion = advice.suggestion
    return {"kv": advice.kv.label, "planned_ctx": advice.planned_ctx,
            "measured": measured_json(advice.measured) if advice.measured else None,
            "note": advice.note, "warning": advice.warning,
            "suggestion": {"ctx": suggestion[0], "kv": suggestion[1].label} if suggestion else None}


def published_json(figures: PublishedRecall, advertised: int) -> dict[str, Any]:
    return {"effective_context": figures.effective_context, "advertised_context": advertised,
            "scores": {str(k): v for k, v in sorted(figures.scores.items())}, "threshold": THRESHOLD,
            "source": figures.source}


def published_for(model: str) -> dict[str, Any] | None:
    """RULER's figures for a model of the built-in profiles (by name, repo id or alias); None for any other."""
    found = published_recall(model)
    return published_json(*found) if found else None


def estimate_recall(model: str, spec: ModelSpec, devices: list[Device], quants: Sequence[str],
                    largest: dict[tuple[str, str], int], *, flash_attn: bool, n_ubatch: int, n_seq: int,
                    n_gpu_layers: int | None) -> tuple[dict[str, Any], list[RecallAdvice]]:
    """`estimate`'s recall: RULER's published figures for a profile; for a local GGUF measured with the suite,
    every KV type measured and, for the largest context that fits with each quant and KV type, the advice."""
    report: dict[str, Any] = {"published": published_for(model), "measured": None, "advice": []}
    path = Path(model).expanduser()
    if spec.source != "gguf" or not path.is_file():
        return report, []
    recall, problem = stored_recall(path)
    if problem:
        report["problem"] = problem
    if recall is None:
        return report, []
    advices = []
    named = {q.upper(): q for q in quants}   # estimate_grid keys its results by the upper-cased quant
    for (quant, kv), ctx in largest.items():
        if ctx:
            machine = Machine(spec, named.get(quant, quant), devices, flash_attn=flash_attn, n_ubatch=n_ubatch, n_seq=n_seq,
                              n_gpu_layers=n_gpu_layers)
            advices.append(advise(recall, ctx // n_seq, KvType.parse(kv), fits=machine.fits()))
    report["measured"] = stored_json(recall)
    report["advice"] = [advice_json(a) for a in advices]
    return report, advices
