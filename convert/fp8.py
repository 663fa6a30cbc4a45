"""FP8 checkpoints: recognise the convention from `quantization_config`, decode weights to float32.

GGUF has no FP8 type, so FP8 weights are decoded, (W − zero_point) · scale, and re-encoded. The conventions
(MODEL_FACTS.md): Meta's fbgemm (per-row `weight_scale` [out, 1]), AutoFP8 (scalar `weight_scale`),
compressed-tensors (tensor (1,), channel (out, 1) or block/group scales, optional `weight_zero_point`) and block-scaled
`weight_scale_inv` [⌈out/b⌉, ⌈in/b⌉] (multiplied, despite its name). Activation and KV-cache scales are not weights:
they are dropped.

How a scale applies is read from its shape, which is unambiguous given the block size: one value (per tensor),
one per row, or one per block. The scheme supplies the block size and which scale name to look for first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError, UnsupportedModelError

FP8_DTYPES: dict[str, Any] = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
SCALE_DTYPES = ("F32", "BF16", "F16")
ZERO_POINT_DTYPES = (*SCALE_DTYPES, *FP8_DTYPES, "I8", "U8", "I32")
DEFAULT_BLOCK = (128, 128)

# Tensors that accompany quantized weights: scales and zero points are consumed by decoding; activation, KV-cache and
# activation-order (g_idx) tensors are dropped.
AUXILIARY_SUFFIXES = (
    "weight_scale", "weight_scale_inv", "weight_zero_point", "weight_global_scale", "weight_g_idx",
    "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
    ".q_scale", ".k_scale", ".v_scale",
)

_COMPRESSED_TENSORS_METHODS = ("compressed-tensors", "compressed_tensors", "sparseml")
_FP8_FORMATS = ("float-quantized", "naive-quantized", "dense")


@dataclass(frozen=True)
class Fp8Scheme:
    kind: str                                       # "fbgemm", "per_tensor", "compressed_tensors" or "block"
    block_size: tuple[int, int] = DEFAULT_BLOCK     # rows × columns one block scale covers
    scale_suffix: str = "_scale"                    # appended to the weight's name; "_scale_inv" for block FP8


def is_auxiliary(name: str) -> bool:
    return name.endswith(AUXILIARY_SUFFIXES)


def scale_candidates(weight_name: str, scheme: Fp8Scheme | None) -> tuple[str, ...]:
    preferred = scheme.scale_suffix if scheme else "_scale"
    other = "_scale_inv" if preferred == "_scale" else "_scale"
    return weight_name + preferred, weight_name + other


def zero_point_name(weight_name: str) -> str:
    return weight_name + "_zero_point"


def detect_fp8_scheme(quantization_config: dict[str, Any] | None, config_path: Path) -> Fp8Scheme | None:
    """The FP8 convention a `quantization_config` (or the older `compression_config`) describes; None without one."""
    if not quantization_config:
        return None
    if not isinstance(quantization_config, dict):
        raise CheckpointError(config_path, "quantization_config must be a JSON object")
    method = quantization_config.get("quant_method")
    if method is None and "config_groups" in quantization_config:
        method = "compressed-tensors"  # some early compression_config blocks carry no quant_method
    method = method.lower() if isinstance(method, str) else method
    if method == "fbgemm_fp8":
        return Fp8Scheme("fbgemm")
    if method == "fp8":
        block = quantization_config.get("weight_block_size")
        if block is None:
            return Fp8Scheme("per_tensor")
        return Fp8Scheme("block", _block(block, config_path, "weight_block_size"), "_scale_inv")
    if method in _COMPRESSED_TENSORS_METHODS:
        return Fp8Scheme("compressed_tensors", _compressed_tensors_block(quantization_config, config_path))
    raise UnsupportedModelError(
        config_path, f"quant_method {method!r} is not supported (FP8 only: fbgemm_fp8, fp8, compressed-tensors); "
                     "convert the unquantized checkpoint instead")


def _compressed_tensors_block(config: dict[str, Any], config_path: Path) -> tuple[int, int]:
    blocks: set[tuple[int, int]] = set()
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise CheckpointError(config_path, "compressed-tensors 'config_groups' must be an object")
    for group_name, group in groups.items():
        group = group if isinstance(group, dict) else {}
        fmt = group.get("format") or config.get("format")
        if fmt is not None and fmt not in _FP8_FORMATS:
            raise UnsupportedModelError(
                config_path, f"compressed-tensors format {fmt!r} is not supported (FP8 'float-quantized' only)")
        weights = group.get("weights")
        if not weights:
            continue  # activations-only group: the weights are stored unquantized
        kind, bits = weights.get("type", "float"), weights.get("num_bits", 8)
        if kind != "float" or bits != 8:
            raise UnsupportedModelError(
                config_path, f"compressed-tensors group {group_name} quantizes weights to {bits}-bit {kind}; "
                             "only 8-bit float (FP8) is supported")
        strategy = weights.get("strategy")
        if strategy == "block":
            blocks.add(_block(weights.get("block_structure") or list(DEFAULT_BLOCK), config_path, "block_structure"))
        elif strategy == "group":
            size = weights.get("group_size")
            if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
                raise CheckpointError(config_path, f"compressed-tensors 'group_size' must be a positive integer, "
                                                   f"got {size!r}")
            blocks.add((1, size))
    if len(blocks) > 1:
        raise UnsupportedModelError(config_path,
                                    f"compressed-tensors groups use different block sizes {sorted(blocks)}")
    return blocks.pop() if blocks else DEFAULT_BLOCK


def _block(value: Any, config_path: Path, key: str) -> tuple[int, int]:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    raise CheckpointError(config_path, f"FP8 '{key}' must give two positive integers, got {value!r}")


# ---- decoding --------------------------------------------------------------------------------------------------------

def scale_layout(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...], block: tuple[int, int]) -> str | None:
    """"tensor", "row" or "block": how a scale of this shape covers the weight; None when it fits none of them."""
    if int(np.prod(scale_shape)) == 1:
        return "tensor"
    if len(weight_shape) != 2:
        return None
    n_rows, n_cols = weight_shape
    if scale_shape in ((n_rows,), (n_rows, 1)):
        return "row"
    if scale_shape == (-(-n_rows // block[0]), -(-n_cols // block[1])):
        return "block"
    return None


def scale_rows(layout: str, lo: int, hi: int, n_scale_rows: int, block: tuple[int, int]) -> tuple[int, int]:
    """The rows of the scale tensor that weight rows [lo, hi) need."""
    if layout == "tensor" or hi <= lo:
        return 0, n_scale_rows
    if layout == "row":
        return lo, hi
    return lo // block[0], (hi - 1) // block[0] + 1


def decode(values: np.ndarray, rows: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, first: int,
           layout: str, block: tuple[int, int]) -> np.ndarray:
    """(values − zero_point) · scale, in place on float32 `values` (the weight rows numbered `rows`); `scale` and
    `zero_point` hold the scale tensor's rows from `first` on (see `scale_rows`)."""
    if zero_point is not None:
        values -= _expand(zero_point, rows, first, layout, block, values.shape)
    values *= _expand(scale, rows, first, layout, block, values.shape)
    return values


def _expand(scale: np.ndarray, rows: np.ndarray, first: int, layout: str, block: tuple[int, int],
            shape: tuple[int, ...]) -> np.ndarray:
    scale = scale.astype(np.float32, copy=False)
    if layout == "tensor":
        return scale.reshape(())
    if layout == "row":
        return scale.reshape(-1)[rows - first][:, None]
    per_block = scale[rows // block[0] - first]
    return np.repeat(per_block, block[1], axis=1)[:, : shape[1]]
