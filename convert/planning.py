"""What each checkpoint tensor becomes in the GGUF: its name, shape, type and bytes, and where it came from.

A function of the config and the safetensors headers only (`TensorSource`: the open checkpoint, or `HeaderView` over
headers fetched from the Hub), so `convert` and `estimate` agree on the file before anything is read or downloaded.

Types: a weight that a GGUF type holds exactly keeps its values (NVFP4 -> NVFP4, MXFP4 -> MXFP4, int4 -> Q4_0 / Q4_1,
int8 -> Q8_0) unless `--outtype` asks for another; a quantized weight no GGUF type holds (GPTQ with activation order,
rows that are not whole blocks) is decoded to F16; FP8 is decoded to BF16 (GGUF has no FP8 type); float weights keep
the checkpoint's dominant float type. NVFP4 weights bring an F32 `<weight>.scale` (their per-tensor factor), which
llama.cpp loads only for the weights of a layer and the output: anything else NVFP4 (an embedding) is decoded.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gguf
import numpy as np

from .arch import ModelAdapter, TensorPlan, adapter_for
from .errors import CheckpointError, UnsupportedModelError
from .fp8 import is_auxiliary
from .quant_config import QuantScheme, detect_scheme
from .quantized import Header, Q, QuantSource, classify
from .quants import OWN_QUANTS, can_encode, tensor_nbytes

OUTTYPES: dict[str, Q | None] = {"auto": None, "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
                                 "q4_0": Q.Q4_0, "nvfp4": Q.NVFP4, "mxfp4": Q.MXFP4}
QUANTIZED_TYPES = (*OWN_QUANTS, Q.Q4_1)
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, Q.NVFP4: gguf.LlamaFileType.MOSTLY_NVFP4,
    Q.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,   # llama.cpp's only MXFP4 file type
}
_FLOAT_SOURCES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
SCALE_SUFFIX = ".scale"


class TensorSource(Protocol):
    names: list[str]
    quant: QuantScheme | None

    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def file_of(self, name: str) -> Path: ...
    def quantized(self, name: str) -> QuantSource | None: ...


class HeaderView:
    """The checkpoint as its headers describe it: {tensor name: (safetensors dtype, shape)}."""

    def __init__(self, headers: dict[str, tuple[str, tuple[int, ...]]], quant: QuantScheme | None, where: Path) -> None:
        self.quant = quant
        self._where = where
        heads = {n: Header(d, tuple(s), where) for n, (d, s) in headers.items()}
        self._sources, consumed = classify(heads, quant)
        by_part = {s.parts["packed"]: s.name for s in self._sources.values()}
        self._heads = heads
        self.names = [by_part.get(n, n) for n in heads if n in by_part or n not in consumed and not is_auxiliary(n)]

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._sources.get(name)
        return src.shape if src else self._heads[name].shape

    def dtype(self, name: str) -> str:
        src = self._sources.get(name)
        return src.kind.upper() if src else self._heads[name].dtype

    def file_of(self, name: str) -> Path:
        return self._where

    def quantized(self, name: str) -> QuantSource | None:
        return self._sources.get(name)


@dataclass
class GGUFPlan:
    plans: list[TensorPlan]
    types: list[Q]
    outtype: str                                   # the file's encoding, for its name: "bf16", "nvfp4", …
    file_type: gguf.LlamaFileType
    origins: dict[str, str] = field(default_factory=dict)   # GGUF name -> where it came from (non-plain only)
    factors: dict[str, str] = field(default_factory=dict)   # `<weight>.scale` -> its weight's source name

    @property
    def quantized(self) -> bool:
        return any(t in QUANTIZED_TYPES for t in self.types)

    def sizes(self) -> list[tuple[str, tuple[int, ...], Q, int]]:
        return [(p.name, p.shape, t, tensor_nbytes(t, p.shape)) for p, t in zip(self.plans, self.types)]


def read_config(model_dir: Path) -> tuple[dict[str, Any], Path]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(model_dir, "not a directory (expected a Hugging Face checkpoint folder)")
    if not path.is_file():
        raise CheckpointError(model_dir, "no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(path, "must hold a JSON object")
    return config, path


def _source_plans(adapter: ModelAdapter, view: TensorSource) -> list[TensorPlan]:
    plans: list[TensorPlan] = []
    for name in view.names:
        plan = adapter.plan_tensor(name, view.shape(name), view.file_of(name))
        if plan is not None:
            plans.append(plan)
    have = {p.name for p in plans}
    missing = [n for n in adapter.required_tensors() if n not in have]
    if missing:
        raise CheckpointError(view.file_of(view.names[0]) if view.names else None,
                              f"checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. {missing[0]}")
    seen: set[str] = set()
    for plan in plans:
        if plan.name in seen:
            raise CheckpointError(view.file_of(plan.source or ""), f"two source tensors map to {plan.name}")
        seen.add(plan.name)
    return plans


def _float_type(view: TensorSource) -> Q:
    """The checkpoint's dominant 2-D float type; FP8 counts as BF16, which keeps its range (GGUF has no FP8 type)."""
    counts = Counter(view.dtype(n) for n in view.names if len(view.shape(n)) == 2 and view.quantized(n) is None)
    dominant = counts.most_common(1)[0][0] if counts else "BF16"
    return _FLOAT_SOURCES.get(dominant, Q.BF16)


def _has_factor_slot(name: str) -> bool:
    """llama.cpp loads `<weight>.scale` for a layer's projections and the output, not for the token embedding."""
    return name.startswith("blk.") and name.endswith(".weight") or name == "output.weight"


def _type_of(plan: TensorPlan, requested: Q | None, float_type: Q, src: QuantSource | None) -> Q:
    if plan.keep_f32 or len(plan.shape) == 1:
        return Q.F32
    if src is not None:
        exact = src.exact_type()
        fp4_ok = exact not in (Q.NVFP4, Q.MXFP4) or _has_factor_slot(plan.name)
        if exact is not None and fp4_ok and requested in (None, exact):
            return exact
    qtype = requested if requested is not None else (Q.F16 if src is not None else float_type)
    if qtype in OWN_QUANTS:
        if qtype in (Q.NVFP4, Q.MXFP4) and plan.name in ("token_embd.weight", "output.weight"):
            return Q.Q8_0  # the embedding has no `.scale` in llama.cpp; the output is the most sensitive tensor
        if not can_encode(qtype, plan.shape[-1]):
            return Q.F16  # rows not a whole number of blocks: llama.cpp's converter falls back the same way
        if qtype == Q.Q4_0 and plan.name == "output.weight":
            return Q.Q8_0  # llama.cpp gives it Q6_K; we use Q8_0
    return qtype


def _origin(src: QuantSource | None, view: TensorSource, source_name: str, qtype: Q) -> str | None:
    if src is not None:
        carried = src.exact_type() == qtype
        return f"{src.origin}, {'carried as' if carried else 'decoded to'} {qtype.name}"
    if view.dtype(source_name).startswith("F8_"):
        label = view.quant.label if view.quant else "FP8"
        return f"{label} {view.dtype(source_name)}, decoded to {qtype.name}"
    return None


def plan_gguf(adapter: ModelAdapter, view: TensorSource, outtype: str = "auto") -> GGUFPlan:
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise UnsupportedModelError(None, f"outtype {outtype!r} is not computed here "
                                          f"(choose from {', '.join(OUTTYPES)})")
    requested = OUTTYPES[outtype]
    plans = _source_plans(adapter, view)
    float_type = _float_type(view)
    types, origins, factors, extra = [], {}, {}, []
    for plan in plans:
        src = view.quantized(plan.source) if plan.source else None
        qtype = _type_of(plan, requested, float_type, src)
        types.append(qtype)
        origin = _origin(src, view, plan.source or "", qtype) if plan.source else None
        if origin:
            origins[plan.name] = origin
        if qtype == Q.NVFP4:
            factor = TensorPlan(name=plan.name.removesuffix(".weight") + SCALE_SUFFIX, shape=(1,),
                                data=np.ones(1, np.float32), keep_f32=True)
            extra.append(factor)
            factors[factor.name] = plan.source or ""
    for plan in adapter.extra_tensors() + extra:
        plans.append(plan)
        types.append(Q.F32)
    weights = Counter(t for p, t in zip(plans, types) if len(p.shape) == 2)
    dominant = requested if requested is not None else (weights.most_common(1)[0][0] if weights else float_type)
    return GGUFPlan(plans, types, outtype if requested is not None else dominant.name.lower(),
                    FILE_TYPES.get(dominant, gguf.LlamaFileType.GUESSED), origins, factors)


def plan_from_headers(config: dict[str, Any], headers: dict[str, tuple[str, tuple[int, ...]]],
                      where: Path, outtype: str = "auto") -> GGUFPlan:
    """The GGUF `lcrun convert` would write from a checkpoint of this config and these safetensors headers (for an
    estimate before download: a Hub repo's config.json and headers, read by range requests)."""
    adapter = adapter_for(config, where)
    quant = detect_scheme(config.get("quantization_config") or config.get("compression_config"), where)
    return plan_gguf(adapter, HeaderView(headers, quant, where), outtype)


def plan_checkpoint(model_dir: Path, outtype: str = "auto") -> GGUFPlan:
    """The GGUF `lcrun convert` would write from a local checkpoint folder (headers and the small companion tensors
    read; no weights)."""
    from .quant_config import load_quantization_config
    from .safetensors_io import Checkpoint

    config, config_path = read_config(model_dir)
    adapter = adapter_for(config, config_path)
    with Checkpoint(model_dir, load_quantization_config(model_dir, config)) as ckpt:
        return plan_gguf(adapter, ckpt, outtype)


def carries_quantized(plan: GGUFPlan) -> bool:
    """Whether the conversion keeps the checkpoint's own 4-/8-bit encoding (then its size is fixed, as a GGUF's)."""
    return any("carried as" in origin for origin in plan.origins.values())
