"""Which ggml type llama.cpp's quantizer gives each tensor of a model, decided before anything is downloaded.

A pure-Python copy of the type choice in the llama.cpp vendored by llama-cpp-python `MIRRORS` (lcrun's one record of
that version, `lcrun.LLAMA_CPP_PYTHON_VERSION`)
(`src/llama-quant.cpp`: `tensor_allows_quantization`, `llama_tensor_get_type_impl`, `tensor_type_fallback`,
`llama_ftype_get_default_type`), for the default quantize parameters: no imatrix, no overrides, not `pure`.
Only the branches the dense and 8-expert llama / qwen2 models reach are reproduced; `tests/test_quant_mix.py` checks
them tensor by tensor against the real quantizer.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import gguf

from lcrun import LLAMA_CPP_PYTHON_VERSION as MIRRORS  # noqa: F401  (the version this copy follows, named in the docstring)

T = gguf.GGMLQuantizationType

SUPPORTED_ARCHS = ("llama", "qwen2")

# llama_ftype_get_default_type; ftypes missing here are refused by llama.cpp or unknown to the gguf package.
_DEFAULT_TYPE: dict[str, T] = {
    "F32": T.F32, "F16": T.F16, "BF16": T.BF16,
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0,
    "Q1_0": T.Q1_0, "MXFP4_MOE": T.MXFP4,
    "Q2_K_S": T.Q2_K, "Q2_K": T.Q2_K,
    "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K,
    "TQ1_0": T.TQ1_0, "TQ2_0": T.TQ2_0,
    "IQ2_XXS": T.IQ2_XXS, "IQ2_XS": T.IQ2_XS, "IQ2_S": T.IQ2_XS, "IQ2_M": T.IQ2_S,
    "IQ3_XXS": T.IQ3_XXS, "IQ3_XS": T.IQ3_S, "IQ3_S": T.IQ3_S, "IQ3_M": T.IQ3_S,
    "IQ1_S": T.IQ1_S, "IQ1_M": T.IQ1_M, "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS,
}
_UNQUANTIZED = frozenset({T.F32, T.F16, T.BF16})

# tensor_type_fallback: a row length the target's block does not divide falls back to a 32-block type
_FALLBACK: dict[T, T] = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}

# tensor_requires_imatrix: without an imatrix llama.cpp stops on a tensor (other than token_embd / output) of these
_NEEDS_IMATRIX = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})
_IQ2_FAMILY = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})

# substrings that keep a 2-D tensor unquantized in tensor_allows_quantization (the ones any llama/qwen2 file can hold)
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
                    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
                    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
                    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
                    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

_LAYER = re.compile(r"blk\.(\d+)\.")


def quantized_nbytes(shape: Sequence[int], qtype: T) -> int:
    """Bytes of a tensor of numpy-order `shape` stored as `qtype`: whole blocks along the last axis."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    cols = shape[-1] if shape else 1
    if cols % block_size:
        raise ValueError(f"a row of {cols} values is not a whole number of {qtype.name} blocks ({block_size})")
    return math.prod(shape[:-1]) * (cols // block_size) * type_size


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, category in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                             ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                             ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                             ("ffn_down", "ffn_down")):
        if needle in name:
            return category
    return "other"


def _allows_quantization(name: str, shape: Sequence[int]) -> bool:
    ne = list(reversed(shape))
    while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims ignores trailing unit dimensions
        ne.pop()
    if len(ne) < 2 or not name.endswith("weight") or name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(part in name for part in _NEVER_QUANTIZED)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_order(name: str) -> tuple[int, str]:
    # llama_model_loader's weights_map order: by block number (none first), then by name; the counters depend on it
    match = _LAYER.match(name)
    return (int(match.group(1)) if match else -1, name)


def _fallback(qtype: T, ncols: int) -> T:
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if ncols % block_size == 0:
        return qtype
    if qtype in _FALLBACK:
        qtype = _FALLBACK[qtype]
    elif block_size > 32:
        raise ValueError(f"llama.cpp defines no fallback for {qtype.name} when a row of {ncols} values does not fit")
    return qtype if ncols % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


class _Chooser:
    """llama_tensor_get_type_impl with its running counters (quantize_state_impl)."""

    def __init__(self, arch: str, ftype: str, names: Sequence[str], *, n_layer: int, n_head: int, n_head_kv: int,
                 n_expert: int) -> None:
        self.ftype = ftype
        self.n_expert = n_expert
        self.n_layer = n_layer
        self.n_gqa = n_head // n_head_kv if n_head_kv else 0
        if arch == "qwen2":
            self.is_70b = n_layer == 80
        else:
            self.is_70b = n_expert != 8 and n_layer == 80 and n_head != n_head_kv
        categories = [_category(n) for n in names]
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in categories)
        self.has_tied_embeddings = "output" not in categories
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def _layer(self, counter: int, name: str) -> int:
        if self.n_expert > 1:  # expert tensors need not be consecutive: read the block number from the name
            match = _LAYER.match(name)
            if not match or not 0 <= int(match.group(1)) < self.n_layer:
                raise ValueError(f"{name}: cannot tell which of the {self.n_layer} layers this tensor is in")
            return int(match.group(1))
        return counter

    def choose(self, name: str, shape: Sequence[int], default: T) -> T:
        if default in _UNQUANTIZED:
            return default
        return _fallback(self._impl(name, shape, default), shape[-1])

    def _impl(self, name: str, shape: Sequence[int], new_type: T) -> T:
        ftype, category, ncols = self.ftype, _category(name), shape[-1]
        if category == "output" or (self.has_tied_embeddings and category == "token_embd"):
            if ftype == "MXFP4_MOE" or ncols % gguf.GGML_QUANT_SIZES[new_type][0]:
                return T.Q8_0
            if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
                return T.Q5_K
            return new_type if new_type == T.Q8_0 else T.Q6_K
        if ftype == "MXFP4_MOE":  # expert stacks (ne[2] > 1) get MXFP4, everything else Q8_0
            return T.MXFP4 if len(shape) == 3 and shape[0] > 1 else T.Q8_0
        if category == "token_embd":
            if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                return T.Q2_K
            if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                return T.IQ3_S
            if ftype in ("TQ1_0", "TQ2_0"):
                return T.Q4_K
            return new_type
        if ftype in _IQ2_FAMILY:
            raise ValueError(f"{ftype} needs an importance matrix")
        if category in ("attn_v", "attn_qkv", "attn_kv_b"):
            return self._attn_v(new_type)
        if category == "attn_k":
            if self.n_expert == 8:
                return T.Q8_0
            return {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}.get(ftype, new_type)
        if category == "attn_q":
            return {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}.get(ftype, new_type)
        if category == "ffn_down":
            i_layer = self._layer(self.i_ffn_down, name)
            self.i_ffn_down += 1
            return self._ffn_down(new_type, i_layer)
        if category == "attn_output":
            if self.n_expert == 8:
                eight = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                         "IQ3_M", "IQ4_XS")
                return T.Q5_K if ftype in eight else new_type
            return {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K,
                    "IQ3_M": T.Q4_K}.get(ftype, new_type)
        if category in ("ffn_gate", "ffn_up"):
            counter = "i_ffn_gate" if category == "ffn_gate" else "i_ffn_up"
            i_layer = self._layer(getattr(self, counter), name)
            setattr(self, counter, getattr(self, counter) + 1)
            if ftype == "IQ3_XS" and self.n_layer // 8 <= i_layer < 7 * self.n_layer // 8:
                return T.IQ3_XXS
        return new_type

    def _attn_v(self, new_type: T) -> T:
        ftype, gqa4 = self.ftype, self.n_gqa >= 4
        i = self.i_attention_wv
        if ftype == "Q2_K":
            new_type = T.Q4_K if gqa4 else T.Q3_K
        elif ftype == "Q2_K_S" and gqa4:
            new_type = T.Q4_K
        elif ftype == "IQ3_XXS":
            new_type = T.Q4_K if gqa4 else T.IQ3_S
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa4:
            new_type = T.Q4_K
        elif ftype == "IQ3_M":
            new_type = T.Q4_K
        elif ftype == "Q3_K_M":
            new_type = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == "Q3_K_L":
            new_type = T.Q5_K
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa4:
            new_type = T.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, self.n_attention_wv):
            new_type = T.Q6_K
        elif ftype == "Q4_K_S" and i < 4:
            new_type = T.Q5_K
        # 70B: 8 heads share each attn_v, so it is 8x smaller than attn_q and more bits cost little
        if self.is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K
        if self.n_expert == 8:
            new_type = T.Q8_0
        self.i_attention_wv += 1
        return new_type

    def _ffn_down(self, new_type: T, i_layer: int) -> T:
        ftype, n_layer = self.ftype, self.n_layer
        if ftype == "Q2_K":
            return T.Q3_K
        if ftype == "Q2_K_S":
            return T.Q4_K if i_layer < n_layer // 8 else new_type
        if ftype == "IQ3_XXS":
            return T.Q4_K if i_layer < n_layer // 8 else T.Q3_K
        if ftype == "Q3_K_M":
            return T.Q5_K if i_layer < n_layer // 16 else T.Q4_K  # the Q3_K arm is Falcon's only
        if ftype == "IQ3_M" and (i_layer < n_layer // 8 or (self.n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            return T.Q4_K
        if ftype == "Q3_K_L":
            return T.Q5_K
        if ftype == "Q4_K_M":
            return T.Q6_K if _use_more_bits(i_layer, n_layer) else new_type
        if i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS"):
            return T.Q5_K
        if ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            return T.Q6_K
        if ftype == "Q4_K_S" and i_layer < n_layer // 8:
            return T.Q5_K
        return new_type


def llama_tensor_types(arch: str, tensors: list[tuple[str, tuple[int, ...]]], ftype: str, *, n_layer: int,
                       n_head: int, n_head_kv: int, n_expert: int = 0,
                       source_types: Mapping[str, T] | None = None) -> dict[str, T]:
    """The ggml type llama.cpp's quantizer writes for each tensor (GGUF name, numpy-order shape) at `ftype`.

    Tensors it does not quantize (1-D, norms, …) keep their source type: `source_types[name]`, else F32.
    Raises ValueError for an architecture or ftype not modelled, or an ftype that needs an importance matrix."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"architecture {arch!r}: quant mix known only for {', '.join(SUPPORTED_ARCHS)}")
    key = ftype.upper()
    if key not in _DEFAULT_TYPE:
        raise ValueError(f"quant type {ftype!r}: llama.cpp cannot write it here (known: {', '.join(_DEFAULT_TYPE)})")
    default = _DEFAULT_TYPE[key]
    ordered = sorted(tensors, key=lambda t: _layer_order(t[0]))
    chooser = _Chooser(arch, key, [name for name, _ in ordered], n_layer=n_layer, n_head=n_head,
                       n_head_kv=n_head_kv, n_expert=n_expert)
    chosen: dict[str, T] = {}
    for name, shape in ordered:
        if _allows_quantization(name, shape):
            qtype = chooser.choose(name, shape, default)
            needs_imatrix = qtype in _NEEDS_IMATRIX or (qtype == T.Q2_K and key == "Q2_K_S")
            if needs_imatrix and _category(name) not in ("token_embd", "output"):
                raise ValueError(f"quant type {key} needs an importance matrix ({name} would be {qtype.name}); "
                                 "llama.cpp refuses it without one")
            chosen[name] = qtype
        else:
            chosen[name] = (source_types or {}).get(name, T.F32)
    return {name: chosen[name] for name, _ in tensors}
