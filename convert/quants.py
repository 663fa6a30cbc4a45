"""Encoding of row chunks into GGUF tensor types: F32, F16, BF16, and ggml's reference Q8_0 / Q4_0 / NVFP4 / MXFP4.

Q8_0 and Q4_0 reproduce ggml's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` bit for bit: the same float32
arithmetic, C's `roundf` (half away from zero) and truncating int casts; NVFP4 and MXFP4 are in fp4.py. Block
geometry comes from `gguf.GGML_QUANT_SIZES`, never retyped.
"""
from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np

from . import fp4

Q = gguf.GGMLQuantizationType

FLOAT_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: ml_dtypes.bfloat16}
OWN_QUANTS = (Q.Q8_0, Q.Q4_0, Q.NVFP4, Q.MXFP4)


def block_size(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def row_nbytes(qtype: Q, n_cols: int) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return n_cols // block * type_size


def tensor_nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * row_nbytes(qtype, shape[-1])


def can_encode(qtype: Q, n_cols: int) -> bool:
    return n_cols % block_size(qtype) == 0


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (ties away from zero), exact for float32: rint (ties to even), then move the exact ties outward."""
    q = np.rint(x)
    ties = np.flatnonzero(np.abs(x - q) == 0.5)
    if ties.size:
        flat, tied = q.reshape(-1), x.reshape(-1)[ties]
        flat[ties] = np.trunc(tied) + np.sign(tied)
    return q


def _block_amax(blocks: np.ndarray) -> np.ndarray:
    """max |x| per block by halving (a reduction along a 32-wide axis is several times slower in numpy)."""
    a = np.abs(blocks)
    width = a.shape[1]
    while width > 1:
        width //= 2
        a = np.maximum(a[:, :width], a[:, width:2 * width])
    return a[:, 0]


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _block_amax(blocks) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    qs = _roundf(blocks * inv[:, None]).astype(np.int8)
    return np.concatenate([d.astype(np.float16).reshape(-1, 1).view(np.uint8), qs.view(np.uint8)], axis=1)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    idx = np.abs(blocks).argmax(axis=1)  # first of equal magnitudes, like ggml's strict `<`
    signed_max = blocks[np.arange(len(blocks)), idx]
    d = signed_max / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    half = blocks.shape[1] // 2
    q = np.minimum(np.trunc(blocks * inv[:, None] + np.float32(8.5)), 15).astype(np.uint8)
    packed = q[:, :half] | (q[:, half:] << 4)
    return np.concatenate([d.astype(np.float16).reshape(-1, 1).view(np.uint8), packed], axis=1)


def encode_rows(rows: np.ndarray, qtype: Q) -> bytes | memoryview:
    """Encode a 2-D (or 1-D) chunk of rows into the bytes of `qtype`, ready to append to the tensor's data."""
    if qtype in FLOAT_TYPES:
        target = FLOAT_TYPES[qtype]
        out = rows if rows.dtype == target else rows.astype(np.float32, copy=False).astype(target)
        return memoryview(np.ascontiguousarray(out).reshape(-1).view(np.uint8))
    blocks = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, block_size(qtype))
    if qtype == Q.Q8_0:
        return _q8_0(blocks).tobytes()
    if qtype == Q.Q4_0:
        return _q4_0(blocks).tobytes()
    if qtype == Q.NVFP4:
        return fp4.quantize_nvfp4(blocks).tobytes()
    if qtype == Q.MXFP4:
        return fp4.quantize_mxfp4(blocks).tobytes()
    raise ValueError(f"{qtype.name} is not encoded here; use llama.cpp's quantizer")
