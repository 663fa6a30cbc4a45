"""FP8 checkpoints: recognise the convention from `quantization_config`, decode weights to float32.

GGUF has no FP8 type, so FP8 weights are decoded (W − zero_point) · scale and re-encoded. The four conventions:
Meta's fbgemm (per-row `weight_scale` [out, 1]), AutoFP8 (scalar `weight_scale`), compressed-tensors (tensor (1,),
channel (out, 1) or one scale per block, optional `weight_zero_point`) and block-scaled `weight_scale_inv`
(multiplied, despite its name). Activation scales (`input_scale`) are not weights and are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, UnsupportedModelError

DEFAULT_BLOCK = (128, 128)
# tensors that accompany quantized weights: consumed by decoding (scales, zero points) or dropped (activations, kv)
AUXILIARY_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".weight_zero_point", ".weight_g_idx",
                      ".input_scale", ".input_zero_point", ".output_scale", ".k_scale", ".v_scale")


@dataclass(frozen=True)
class Fp8Scheme:
    kind: str                            # "fbgemm", "per_tensor", "compressed_tensors" or "block"
    block_size: tuple[int, int] = DEFAULT_BLOCK


def is_auxiliary(name: str) -> bool:
    return name.endswith(AUXILIARY_SUFFIXES)


def detect_fp8_scheme(quantization_config: dict[str, Any] | None, config_path: Path) -> Fp8Scheme | None:
    if not quantization_config:
        return None
    if not isinstance(quantization_config, dict):
        raise CheckpointError(config_path, "quantization_config must be an object")
    method = quantization_config.get("quant_method", "compressed-tensors" if "config_groups" in quantization_config else None)
    if method == "fbgemm_fp8":
        return Fp8Scheme("fbgemm")
    if method == "fp8":
        block = quantization_config.get("weight_block_size")
        return Fp8Scheme("block", _block(block, config_path)) if block else Fp8Scheme("per_tensor")
    if method == "compressed-tensors":
        fmt = quantization_config.get("format", "float-quantized")
        if fmt not in ("float-quantized", "naive-quantized", "dense"):
            raise UnsupportedModelError(config_path, f"compressed-tensors format {fmt!r} is not supported (only FP8 'float-quantized')")
        block = DEFAULT_BLOCK
        for group in (quantization_config.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            if weights.get("type", "float") != "float" or weights.get("num_bits", 8) != 8:
                raise UnsupportedModelError(config_path, "compressed-tensors weights that are not 8-bit float are not supported")
            if weights.get("block_structure"):
                block = _block(weights["block_structure"], config_path)
        return Fp8Scheme("compressed_tensors", block)
    raise UnsupportedModelError(
        config_path, f"quant_method {method!r} is not supported (FP8 only: fbgemm_fp8, fp8, compressed-tensors); "
                     "convert the unquantized checkpoint instead")


def _block(value: Any, config_path: Path) -> tuple[int, int]:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    raise CheckpointError(config_path, f"FP8 block size must be two positive integers, got {value!r}")


def dequantize_rows(weight_rows: np.ndarray, rows: np.ndarray, n_cols: int, scale: np.ndarray,
                    zero_point: np.ndarray | None, scheme: Fp8Scheme, n_rows: int, where: str) -> np.ndarray:
    """Decode FP8 rows (the source rows numbered `rows`) of a weight of shape (n_rows, n_cols) to float32."""
    values = weight_rows.astype(np.float32)
    if zero_point is not None:
        values -= _expand(zero_point.astype(np.float32), rows, n_cols, n_rows, scheme, where)
    return values * _expand(scale.astype(np.float32), rows, n_cols, n_rows, scheme, where)


def _expand(scale: np.ndarray, rows: np.ndarray, n_cols: int, n_rows: int, scheme: Fp8Scheme, where: str) -> np.ndarray:
    if scale.size == 1:
        return scale.reshape(())
    if scale.shape in ((n_rows,), (n_rows, 1)):
        return scale.reshape(-1)[rows][:, None]
    b0, b1 = scheme.block_size
    if scale.shape == (-(-n_rows // b0), -(-n_cols // b1)):
        cols = np.arange(n_cols) // b1
        return scale[rows // b0][:, cols]
    raise CheckpointError(where, f"FP8 scale of shape {list(scale.shape)} fits neither per-tensor, per-row nor "
                                 f"{b0}x{b1} blocks of a [{n_rows}, {n_cols}] weight")
