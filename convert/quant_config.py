"""Which quantization a checkpoint declares: `quantization_config` (config.json), the older `compression_config`, or
ModelOpt's `hf_quant_config.json`. The per-tensor format is read from the tensors themselves (quantized.py); this
says which formats may appear and supplies what the headers cannot tell (bits, group size, GPTQ's zero offset)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModelError
from .fp8 import COMPRESSED_TENSORS_METHODS, Fp8Scheme, fp8_scheme_for

HF_QUANT_CONFIG = "hf_quant_config.json"

# the per-tensor formats a method may hold (quantized.py's kinds)
_KINDS = {
    "fbgemm_fp8": {"fp8"}, "fp8": {"fp8"},
    "compressed-tensors": {"fp8", "nvfp4", "mxfp4", "intpack"},
    "modelopt": {"fp8", "nvfp4"},
    "gptq": {"gptq"}, "awq": {"awq"},
}
_CT_FORMATS = ("float-quantized", "naive-quantized", "dense", "nvfp4-pack-quantized", "mxfp4-pack-quantized",
               "pack-quantized", "int-quantized", "mixed-precision")


@dataclass(frozen=True)
class QuantScheme:
    method: str                          # a key of _KINDS
    label: str                           # for messages and `inspect`: "ModelOpt NVFP4", "GPTQ int4 g128", …
    fp8: Fp8Scheme | None = None         # how FP8 scales apply, where FP8 tensors may appear
    bits: tuple[int, ...] = ()           # integer widths: compressed-tensors groups, GPTQ/AWQ `bits`
    group_size: int | None = None        # GPTQ/AWQ
    symmetric: bool = True               # GPTQ `sym`, AWQ `not zero_point`
    desc_act: bool = False               # GPTQ activation order: groups interleave columns (g_idx)
    gptq_v2: bool = False                # GPTQ checkpoint_format gptq_v2 stores zero points without v1's −1
    w4a16: bool = False                  # ModelOpt W4A16_NVFP4: activations must not be rounded to 4 bits

    @property
    def kinds(self) -> set[str]:
        return _KINDS[self.method]


def load_quantization_config(model_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's quantization block, completed from hf_quant_config.json where ModelOpt wrote one."""
    qc = config.get("quantization_config") or config.get("compression_config")
    path = model_dir / HF_QUANT_CONFIG
    if not path.is_file() or (isinstance(qc, dict) and qc.get("quant_method") not in (None, "modelopt")):
        return qc
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from None
    quant = data.get("quantization") if isinstance(data, dict) else None
    if not isinstance(quant, dict):
        raise CheckpointError(path, "no 'quantization' object")
    return {**quant, **(qc if isinstance(qc, dict) else {}), "quant_method": "modelopt"}


def detect_scheme(qc: dict[str, Any] | None, config_path: Path) -> QuantScheme | None:
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(config_path, "quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method is None and "config_groups" in qc:
        method = "compressed-tensors"  # some early compression_config blocks carry no quant_method
    method = method.lower() if isinstance(method, str) else method
    if method in ("fbgemm_fp8", "fp8"):
        return QuantScheme(method, "FP8", fp8_scheme_for(qc, method, config_path))
    if method in COMPRESSED_TENSORS_METHODS:
        return _compressed_tensors(qc, config_path)
    if method == "modelopt":
        algo = str(qc.get("quant_algo") or "")
        known = ("FP8", "NVFP4", "W4A16_NVFP4", "MIXED_PRECISION")
        if algo not in known:
            raise UnsupportedModelError(config_path, f"ModelOpt quant_algo {algo or None!r} is not supported "
                                                     f"(supported: {', '.join(known)})")
        return QuantScheme("modelopt", f"ModelOpt {algo}", Fp8Scheme("per_tensor"), w4a16=algo == "W4A16_NVFP4")
    if method in ("gptq", "awq"):
        return _gptq_awq(qc, method, config_path)
    raise UnsupportedModelError(
        config_path, f"quant_method {method!r} is not supported (supported: fbgemm_fp8, fp8, compressed-tensors, "
                     "modelopt, gptq, awq); convert the unquantized checkpoint instead")


def _compressed_tensors(qc: dict[str, Any], config_path: Path) -> QuantScheme:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise CheckpointError(config_path, "compressed-tensors 'config_groups' must be an object")
    formats, bits = set(), set()
    for name, group in groups.items():
        group = group if isinstance(group, dict) else {}
        fmt = group.get("format") or qc.get("format")
        if fmt is not None and fmt not in _CT_FORMATS:
            raise UnsupportedModelError(config_path, f"compressed-tensors format {fmt!r} is not supported "
                                                     f"(supported: {', '.join(_CT_FORMATS[:-1])})")
        weights = group.get("weights")
        if not isinstance(weights, dict):
            continue  # activations-only group: the weights are stored unquantized
        kind, n = weights.get("type", "int"), weights.get("num_bits", 8)
        if (kind, n) not in (("float", 8), ("float", 4)) and not (kind == "int" and n in (2, 4, 8)):
            raise UnsupportedModelError(config_path, f"compressed-tensors group {name} quantizes weights to {n}-bit "
                                                     f"{kind}; supported: 8-bit float, 4-bit float, int2/4/8")
        if kind == "int":
            bits.add(int(n))
        formats.add(f"{n}-bit {kind}")
    label = "compressed-tensors " + (", ".join(sorted(formats)) or str(qc.get("format")))
    return QuantScheme("compressed-tensors", label, fp8_scheme_for(qc, "compressed-tensors", config_path),
                       bits=tuple(sorted(bits)))


def _gptq_awq(qc: dict[str, Any], method: str, config_path: Path) -> QuantScheme:
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    if bits not in (2, 4, 8):
        raise UnsupportedModelError(config_path, f"{method} bits {bits!r} are not supported (2, 4 or 8)")
    if not (isinstance(group, int) and not isinstance(group, bool) and (group > 0 or group == -1)):
        raise CheckpointError(config_path, f"{method} 'group_size' must be a positive integer or -1, got {group!r}")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(config_path, f"AWQ version {version!r} is not supported (only 'gemm', the "
                                                     "layout AutoAWQ and transformers write by default)")
        sym = not qc.get("zero_point", True)
        return QuantScheme("awq", f"AWQ int{bits} g{group}", bits=(bits,), group_size=group, symmetric=sym)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(config_path, f"GPTQ checkpoint_format {fmt!r} is not supported "
                                                 "(gptq, gptq_v2)")
    desc = bool(qc.get("desc_act", False))
    label = f"GPTQ int{bits} g{group}" + (" desc_act" if desc else "")
    return QuantScheme("gptq", label, bits=(bits,), group_size=group, symmetric=bool(qc.get("sym", True)),
                       desc_act=desc, gptq_v2=fmt == "gptq_v2")
