"""Which checkpoint tensors make each 4-bit or packed-integer weight, and what GGUF type holds it exactly.

A pure function of the safetensors headers (names, dtypes, shapes) and the declared scheme, so the converter and
`estimate` (headers fetched from the Hub, nothing downloaded) plan the same file. The formats (MODEL_FACTS.md):

| kind    | written by                          | tensors (logical weight [out, in])                                  |
|---------|-------------------------------------|---------------------------------------------------------------------|
| nvfp4   | ModelOpt                            | weight U8 [out, in/2], weight_scale F8_E4M3 [out, in/16], weight_scale_2 F32 (multiplies) |
| nvfp4   | compressed-tensors nvfp4-pack-quantized | weight_packed U8, weight_scale F8_E4M3, weight_global_scale F32 (divides) |
| mxfp4   | compressed-tensors mxfp4-pack-quantized | weight_packed U8 [out, in/2], weight_scale U8 (E8M0) [out, in/32] |
| intpack | compressed-tensors pack-quantized   | weight_packed I32 [out, in·bits/32], weight_scale [out, groups], weight_shape, weight_zero_point I32 [out·bits/32, groups] (asymmetric) |
| gptq    | GPTQ (AutoGPTQ, GPTQModel)           | qweight I32 [in·bits/32, out], qzeros I32 [groups, out·bits/32], scales [groups, out], g_idx I32 [in] |
| awq     | AutoAWQ GEMM                         | qweight I32 [in, out·bits/32] (nibble order 0 2 4 6 1 3 5 7), qzeros, scales [groups, out] |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf

from .errors import CheckpointError, UnsupportedModelError
from .fp4 import MXFP4_BLOCK, NVFP4_BLOCK, NVFP4_GROUP
from .quant_config import QuantScheme

Q = gguf.GGMLQuantizationType
SCALE_DTYPES = ("F32", "F16", "BF16")
INT_QUANT_BLOCK = 32                       # Q4_0, Q4_1 and Q8_0 hold one scale per 32 values

# what every role of every kind is called in the checkpoint, after the module's name (`model.layers.0.mlp.up_proj`)
_PARTS = {
    "nvfp4-modelopt": {"packed": ".weight", "scale": ".weight_scale", "global": ".weight_scale_2"},
    "nvfp4-ct": {"packed": ".weight_packed", "scale": ".weight_scale", "global": ".weight_global_scale"},
    "mxfp4": {"packed": ".weight_packed", "scale": ".weight_scale"},
    "intpack": {"packed": ".weight_packed", "scale": ".weight_scale", "shape": ".weight_shape",
                "zero": ".weight_zero_point"},
    "gptq": {"packed": ".qweight", "scale": ".scales", "zero": ".qzeros", "g_idx": ".g_idx"},
    "awq": {"packed": ".qweight", "scale": ".scales", "zero": ".qzeros"},
}
# consumed with the weight but not needed to decode it (activation scales and the like)
_DROPPED = (".input_scale", ".input_global_scale", ".input_zero_point", ".k_scale", ".v_scale", ".bias_placeholder")


@dataclass(frozen=True)
class Header:
    dtype: str
    shape: tuple[int, ...]
    file: Path


@dataclass(frozen=True)
class QuantSource:
    """One exported weight stored in a 4-bit or packed-integer format."""
    name: str                                  # the weight's logical name, `<module>.weight`
    kind: str                                  # "nvfp4", "mxfp4", "intpack", "gptq", "awq"
    shape: tuple[int, int]                     # logical [out, in]
    parts: dict[str, str] = field(default_factory=dict)   # role -> checkpoint tensor name
    bits: int = 4
    group: int = 0                             # values of a row per scale; the whole row when 0 (per channel)
    symmetric: bool = True
    global_divides: bool = False               # compressed-tensors' global scale divides; ModelOpt's multiplies
    gptq_v2: bool = False
    g_idx: bool = False                        # GPTQ activation order: column i belongs to group g_idx[i]
    origin: str = ""                           # "ModelOpt NVFP4", "GPTQ int4 g128 sym", … (for inspect)

    def exact_type(self) -> Q | None:
        """The GGUF type that holds every value exactly (its scales permitting; see int_packed), or None."""
        n_in = self.shape[1]
        if self.kind == "nvfp4":
            return Q.NVFP4 if n_in % NVFP4_BLOCK == 0 else None
        if self.kind == "mxfp4":
            return Q.MXFP4 if n_in % MXFP4_BLOCK == 0 else None
        if self.g_idx or n_in % INT_QUANT_BLOCK or (self.group or n_in) % INT_QUANT_BLOCK:
            return None  # a 32-value block would span two groups' scales
        if self.bits == 4:
            return Q.Q4_0 if self.symmetric else Q.Q4_1
        if self.bits == 8 and self.symmetric:
            return Q.Q8_0
        return None


def _module(name: str, suffix: str) -> str:
    return name[: -len(suffix)]


def classify(headers: dict[str, Header], scheme: QuantScheme | None) -> tuple[dict[str, QuantSource], set[str]]:
    """The quantized weights of a checkpoint, keyed by logical name, and every tensor name they consume."""
    sources: dict[str, QuantSource] = {}
    consumed: set[str] = set()
    kinds = scheme.kinds if scheme else {"nvfp4"} if any(n.endswith(".weight_scale_2") for n in headers) else set()
    for name, head in headers.items():
        kind = _kind_of(name, head, headers, scheme)
        if kind is None:
            continue
        family = kind.split("-")[0]
        if family not in kinds:
            why = (f"which {scheme.label} does not declare" if scheme
                   else "but config.json has no quantization_config (and there is no hf_quant_config.json)")
            raise UnsupportedModelError(head.file, f"tensor {name} is stored as {family.upper()}, {why}")
        module = _module(name, _PARTS[kind]["packed"])
        parts = {role: module + suffix for role, suffix in _PARTS[kind].items() if module + suffix in headers}
        source = _validate(module, kind, parts, headers, scheme)
        sources[source.name] = source
        consumed.update(parts.values())
        consumed.update(module + s for s in _DROPPED if module + s in headers)
    return sources, consumed


def _kind_of(name: str, head: Header, headers: dict[str, Header], scheme: QuantScheme | None) -> str | None:
    if name.endswith(".weight_packed"):
        scale = headers.get(_module(name, ".weight_packed") + ".weight_scale")
        if head.dtype == "I32":
            return "intpack"
        if head.dtype == "U8":
            return "mxfp4" if scale is not None and scale.dtype == "U8" else "nvfp4-ct"
        raise UnsupportedModelError(head.file, f"tensor {name} has dtype {head.dtype}; packed weights are U8 (FP4) or "
                                               "I32 (integers)")
    if name.endswith(".qweight"):
        return scheme.method if scheme and scheme.method in ("gptq", "awq") else "gptq"
    if name.endswith(".weight") and head.dtype == "U8" and name + "_scale" in headers:
        return "nvfp4-modelopt"
    return None


def _fail(head: Header, message: str) -> CheckpointError:
    return CheckpointError(head.file, message)


def _expect(headers: dict[str, Header], parts: dict[str, str], role: str, kind: str, dtypes: tuple[str, ...],
            shape: tuple[int, ...] | None, what: str) -> Header:
    packed = headers[parts["packed"]]
    name = parts.get(role)
    if name is None:
        suffix = _PARTS[kind][role].lstrip(".")
        raise _fail(packed, f"{what} tensor {parts['packed']} has no {suffix} to decode it with")
    head = headers[name]
    if head.dtype not in dtypes:
        raise UnsupportedModelError(head.file, f"{what} {role} {name} has dtype {head.dtype}; expected "
                                               f"{' or '.join(dtypes)}")
    if shape is not None and head.shape != shape and not (len(shape) <= 1 and _numel(head.shape) == _numel(shape)):
        raise _fail(head, f"{what} {role} {name} has shape {list(head.shape)}; {parts['packed']} "
                          f"{list(packed.shape)} needs {list(shape)}")
    return head


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _validate(module: str, kind: str, parts: dict[str, str], headers: dict[str, Header],
              scheme: QuantScheme | None) -> QuantSource:
    packed = headers[parts["packed"]]
    if kind.startswith("nvfp4") or kind == "mxfp4":
        if len(packed.shape) != 2:
            raise _fail(packed, f"FP4 tensor {parts['packed']} has shape {list(packed.shape)}; expected 2-D")
        rows, n_in = packed.shape[0], packed.shape[1] * 2
        group = NVFP4_GROUP if kind != "mxfp4" else MXFP4_BLOCK
        what = "MXFP4" if kind == "mxfp4" else "NVFP4"
        if n_in % group:
            raise _fail(packed, f"{what} tensor {parts['packed']} has {n_in} values per row, not a multiple of {group}")
        scale_dtype = ("U8",) if kind == "mxfp4" else ("F8_E4M3",)
        _expect(headers, parts, "scale", kind, scale_dtype, (rows, n_in // group), what)
        if kind != "mxfp4":
            _expect(headers, parts, "global", kind, ("F32", "BF16", "F16"), (1,), what)
        origin = {"nvfp4-modelopt": "ModelOpt NVFP4", "nvfp4-ct": "compressed-tensors NVFP4",
                  "mxfp4": "compressed-tensors MXFP4"}[kind]
        return QuantSource(module + ".weight", kind.split("-")[0], (rows, n_in), parts, group=group,
                           global_divides=kind == "nvfp4-ct", origin=origin)
    if packed.dtype != "I32" or len(packed.shape) != 2:
        raise UnsupportedModelError(packed.file, f"tensor {parts['packed']} has dtype {packed.dtype} and shape "
                                                 f"{list(packed.shape)}; packed integer weights are 2-D I32")
    if kind == "intpack":
        return _intpack(module, parts, headers, scheme)
    return _gptq_awq(module, kind, parts, headers, scheme)


def _intpack(module: str, parts: dict[str, str], headers: dict[str, Header],
             scheme: QuantScheme | None) -> QuantSource:
    packed = headers[parts["packed"]]
    bits_choices = scheme.bits if scheme and scheme.bits else (4,)
    rows, words = packed.shape
    _expect(headers, parts, "shape", "intpack", ("I64", "I32"), (2,), "pack-quantized")
    scale = _expect(headers, parts, "scale", "intpack", SCALE_DTYPES, None, "pack-quantized")
    if len(scale.shape) != 2 or scale.shape[0] != rows:
        raise _fail(scale, f"pack-quantized scale {parts['scale']} has shape {list(scale.shape)}; "
                           f"{parts['packed']} {list(packed.shape)} needs [{rows}, groups]")
    # the width a row of `words` int32 holds; the exact column count is checked against weight_shape on load
    bits = bits_choices[0] if len(bits_choices) == 1 else next(
        (b for b in bits_choices if (words * 32 // b) % scale.shape[1] == 0), bits_choices[0])
    n_in = words * 32 // bits
    groups = scale.shape[1]
    symmetric = "zero" not in parts
    if not symmetric:
        _expect(headers, parts, "zero", "intpack", ("I32",), (-(-rows * bits // 32), groups), "pack-quantized")
    group = 0 if groups == 1 else n_in // groups
    layout = f"g{group}" if group else "channel"
    origin = f"compressed-tensors int{bits} {layout} {'sym' if symmetric else 'asym'}"
    return QuantSource(module + ".weight", "intpack", (rows, n_in), parts, bits=bits, group=group,
                       symmetric=symmetric, origin=origin)


def _gptq_awq(module: str, kind: str, parts: dict[str, str], headers: dict[str, Header],
              scheme: QuantScheme | None) -> QuantSource:
    packed = headers[parts["packed"]]
    bits = scheme.bits[0] if scheme and scheme.bits else 4
    per_word = 32 // bits
    if kind == "gptq":
        n_in, n_out = packed.shape[0] * per_word, packed.shape[1]
    else:
        n_in, n_out = packed.shape[0], packed.shape[1] * per_word
    group = scheme.group_size if scheme and scheme.group_size else 128
    groups = 1 if group == -1 else -(-n_in // group)
    what = kind.upper()
    _expect(headers, parts, "scale", kind, SCALE_DTYPES, (groups, n_out), what)
    _expect(headers, parts, "zero", kind, ("I32",), (groups, n_out // per_word), what)
    g_idx = False
    if kind == "gptq" and "g_idx" in parts:
        _expect(headers, parts, "g_idx", kind, ("I32", "I64"), (n_in,), what)
        g_idx = bool(scheme and scheme.desc_act)
    symmetric = scheme.symmetric if scheme else True
    label = f"{what} int{bits} {'g' + str(group) if group != -1 else 'channel'} {'sym' if symmetric else 'asym'}"
    return QuantSource(module + ".weight", kind, (n_out, n_in), parts, bits=bits,
                       group=0 if group == -1 else group, symmetric=symmetric,
                       gptq_v2=bool(scheme and scheme.gptq_v2), g_idx=g_idx,
                       origin=label + (" desc_act" if g_idx else ""))
