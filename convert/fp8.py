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

COMPRESSED_TENSORS_METHODS = ("compressed-tensors", "compressed_tensors", "sparseml")


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


def fp8_scheme_for(quantization_config: dict[str, Any], method: str, config_path: Path) -> Fp8Scheme:
    """How FP8 scales apply under a detected quant_method (quant_config.detect_scheme reads the method)."""
    if method == "fbgemm_fp8":
        return Fp8Scheme("fbgemm")
    if method == "fp8":
        block = quantization_config.get("weight_block_size")
        if block is None:
            return Fp8Scheme("per_tensor")
        return Fp8Scheme("block", _block(block, config_path, "weight_block_size"), "_scale_inv")
    return Fp8Scheme("compressed_tensors", _compressed_tensors_block(quantization_config, config_path))


def _compressed_tensors_block(config: dict[str, Any], config_path: Path) -> tuple[int, int]:
    """The block one FP8 scale covers, from the groups that quantize weights to 8-bit float."""
    blocks: set[tuple[int, int]] = set()
    groups = config.get("config_groups") or {}
    for group in groups.values() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict) or (weights.get("type", "int"), weights.get("num_bits", 8)) != ("float", 8):
            continue
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


@dataclass(frozen=True)
class Fp8Binding:
    scale: Any                     # the checkpoint's tensor records (safetensors_io._Tensor)
    zero_point: Any | None
    layout: str                    # "tensor", "row" or "block" (scale_layout)
    block: tuple[int, int]


def bind(weight: Any, tensors: dict[str, Any], scheme: Fp8Scheme | None) -> Fp8Binding:
    """The scale (and zero point) of an FP8 weight among the checkpoint's `tensors`, checked against its shape."""
    candidates = scale_candidates(weight.name, scheme)
    scale = next((tensors[c] for c in candidates if c in tensors), None)
    if scale is None:
        raise CheckpointError(weight.file, f"FP8 tensor {weight.name} has no {candidates[0].rsplit('.', 1)[-1]} "
                                           f"(nor {candidates[1].rsplit('.', 1)[-1]}) to decode it with")
    if scale.dtype not in SCALE_DTYPES:
        raise UnsupportedModelError(scale.file, f"FP8 scale {scale.name} has dtype {scale.dtype}; "
                                                f"scales must be one of {', '.join(SCALE_DTYPES)}")
    block = scheme.block_size if scheme else DEFAULT_BLOCK
    layout = scale_layout(scale.shape, weight.shape, block)
    if layout is None:
        raise CheckpointError(scale.file, f"FP8 scale {scale.name} of shape {list(scale.shape)} fits neither "
                                          f"per-tensor, per-row nor {block[0]}x{block[1]} blocks of "
                                          f"{weight.name} {list(weight.shape)}")
    zero_point = tensors.get(zero_point_name(weight.name))
    if zero_point is not None:
        if zero_point.dtype not in ZERO_POINT_DTYPES:
            raise UnsupportedModelError(zero_point.file, f"FP8 zero point {zero_point.name} has dtype "
                                                         f"{zero_point.dtype}")
        if zero_point.shape != scale.shape:
            raise CheckpointError(zero_point.file, f"FP8 zero point {zero_point.name} has shape "
                                                   f"{list(zero_point.shape)}, its scale {list(scale.shape)}")
    return Fp8Binding(scale, zero_point, layout, block)


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
