"""FP4 (E2M1) weights: NVFP4 and MXFP4 checkpoints repacked into ggml's blocks, and ggml's reference quantizers.

Checkpoints (compressed-tensors 0.20, ModelOpt) store a row of E2M1 codes two to a byte, element 2i in the low
nibble and 2i+1 in the high one. The code is the same 4-bit number in ggml: sign bit 3, magnitude index 0..7 into
0, 0.5, 1, 1.5, 2, 3, 4, 6 (ggml's table `kvalues_fp4` holds the doubled values and its scale decoders halve). So
repacking moves nibbles, never changes them:

- NVFP4: one E4M3 scale byte per 16 values. ggml's `block_nvfp4` holds 64 values: the 4 scale bytes as they are
  (ggml reads them as unsigned E4M3, so a scale with its sign bit set has no exact image), then 32 bytes in which
  byte j of each 16-value sub-block pairs value j (low) with j + 8 (high). The per-tensor factor (ModelOpt's
  `weight_scale_2`, 1 / compressed-tensors' `weight_global_scale`) is not in the block: llama.cpp multiplies the
  matmul output by an F32 tensor `<weight>.scale`.
- MXFP4: one E8M0 byte (2^(e-127)) per 32 values, carried unchanged; byte j pairs value j with j + 16.

`quantize_nvfp4` / `quantize_mxfp4` reproduce ggml's `quantize_row_nvfp4_ref` / `quantize_row_mxfp4_ref` byte for
byte (tests/test_fp4.py compares them through ctypes with ggml itself).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

NVFP4_GROUP = 16            # values per E4M3 scale
NVFP4_BLOCK = 64            # values per ggml block_nvfp4
MXFP4_BLOCK = 32            # values per E8M0 scale and per ggml block_mxfp4

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
_KVALUES = (2 * E2M1).astype(np.float32)   # ggml's kvalues_fp4: the doubled E2M1 values, -0 as 0
E4M3_NAN = 0x7F                             # also 0xFF; ggml reads 0x7F as 0


# ---- checkpoint layout -----------------------------------------------------------------------------------------------

def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """uint8 [rows, n/2] in the checkpoints' order (2i low nibble, 2i+1 high) -> one code per value, [rows, n]."""
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def nvfp4_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ggml NVFP4 rows from codes [rows, n] and E4M3 scale bytes [rows, n/16]: uint8 [rows, n/64 * 36]."""
    rows, n = codes.shape
    sub = codes.reshape(rows, n // NVFP4_GROUP, NVFP4_GROUP)
    qs = (sub[..., :8] | (sub[..., 8:] << 4)).reshape(rows, n // NVFP4_BLOCK, 32)
    d = scales.reshape(rows, n // NVFP4_BLOCK, 4)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def mxfp4_blocks(codes: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """ggml MXFP4 rows from codes [rows, n] and E8M0 bytes [rows, n/32]: uint8 [rows, n/32 * 17]."""
    rows, n = codes.shape
    blk = codes.reshape(rows, n // MXFP4_BLOCK, MXFP4_BLOCK)
    qs = blk[..., :16] | (blk[..., 16:] << 4)
    return np.concatenate([exponents.reshape(rows, -1, 1), qs], axis=-1).reshape(rows, -1)


def e4m3_values(scale_bytes: np.ndarray) -> np.ndarray:
    return scale_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e8m0_values(exponents: np.ndarray) -> np.ndarray:
    """2^(e-127) as float32, exactly (e = 0 is 2^-127, a float32 subnormal)."""
    return np.ldexp(np.float32(1), exponents.astype(np.int32) - 127).astype(np.float32)


def nvfp4_values(codes: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """E2M1 · E4M3 scale per 16 values: what a ggml NVFP4 block decodes to (the per-tensor factor not applied)."""
    scale = np.repeat(e4m3_values(scale_bytes), NVFP4_GROUP, axis=-1)
    return E2M1[codes] * scale


def mxfp4_values(codes: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    return E2M1[codes] * np.repeat(e8m0_values(exponents), MXFP4_BLOCK, axis=-1)


# ---- ggml's reference quantizers -------------------------------------------------------------------------------------

def fp32_to_ue4m3(x: np.ndarray) -> np.ndarray:
    """ggml_fp32_to_ue4m3: round half up on the mantissa, saturate to 448 (0x7E), subnormals round(x · 512)."""
    x = np.minimum(np.asarray(x, dtype=np.float32), np.float32(448))
    bits = x.view(np.uint32)
    exp = ((bits >> 23) & 0xFF).astype(np.int32) - 127 + 7
    man = ((bits >> 20) & 0x7).astype(np.int32) + ((bits >> 19) & 1).astype(np.int32)
    carry = man > 7
    exp = np.where(carry, exp + 1, exp)
    man = np.where(carry, 0, man)
    normal = np.where(exp >= 15, 0x7E, (np.clip(exp, 0, 15) << 3) | man)
    sub = np.minimum((x * np.float32(512) + np.float32(0.5)).astype(np.int32), 7)
    sub = np.where(sub < 1, 0, sub)
    out = np.where(exp - carry <= 0, sub, normal)   # the subnormal test is on the exponent before rounding
    return np.where(x > 0, out, 0).astype(np.uint8)


def ue4m3_to_fp32_half(u: np.ndarray) -> np.ndarray:
    """ggml_ue4m3_to_fp32: the unsigned E4M3 value times 0.5 (ggml's codes are doubled); 0 and 0x7F read as 0."""
    u = u.astype(np.int32)
    exp, man = (u >> 3) & 0xF, (u & 7).astype(np.float32)
    raw = np.where(exp == 0, np.ldexp(man, -9), np.ldexp(np.float32(1) + man / np.float32(8), exp - 7))
    return np.where((u == 0) | (u == E4M3_NAN), 0, raw * np.float32(0.5)).astype(np.float32)


def _best_codes(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ggml's best_index_mxfp4 for every value of x [..., n], d [...] the scale of each row of n: the first code of
    least |kvalue · d − x|, in float32 arithmetic.

    Half the table suffices: for x < 0 every positive code is further than code 0, and |−k·d − x| is computed as
    |k·d − |x|| with the same roundings (negation is exact), so the negative half is the positive half on |x|."""
    ax = np.abs(x)
    err = np.abs(_KVALUES[:8] * d[..., None, None] - ax[..., None])
    codes = err.argmin(axis=-1).astype(np.uint8)   # argmin keeps the first of equal errors, as ggml's strict `<`
    codes[(x < 0) & (codes != 0)] += 8
    return codes


def quantize_nvfp4(blocks: np.ndarray) -> np.ndarray:
    """float32 [n_blocks, 64] -> ggml block_nvfp4 bytes [n_blocks, 36] (quantize_row_nvfp4_ref)."""
    sub = blocks.reshape(len(blocks), 4, NVFP4_GROUP)
    amax = np.abs(sub).max(axis=-1)
    ue = fp32_to_ue4m3(amax / np.float32(6))
    codes = _best_codes(sub, ue4m3_to_fp32_half(ue))
    qs = (codes[..., :8] | (codes[..., 8:] << 4)).reshape(len(blocks), 32)
    return np.concatenate([ue, qs], axis=1)


def mxfp4_exponents(amax: np.ndarray) -> np.ndarray:
    """(uint8)(floorf(log2f(amax)) − 2 + 127), 0 where amax is 0.

    log2f is emulated as float64 log2 rounded to float32: its rounding decides the floor just below a power of two
    (log2f(0.0625 · (1 − 2^-24)) rounds up to −4.0). The cast keeps the low byte, as x86's conversion does."""
    with np.errstate(divide="ignore"):
        lg = np.log2(np.where(amax > 0, amax, 1).astype(np.float64)).astype(np.float32)
    e = np.floor(lg).astype(np.int64) - 2 + 127
    return np.where(amax > 0, e & 0xFF, 0).astype(np.uint8)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e-128)."""
    return np.ldexp(np.float32(1), e.astype(np.int32) - 128).astype(np.float32)


def quantize_mxfp4(blocks: np.ndarray) -> np.ndarray:
    """float32 [n_blocks, 32] -> ggml block_mxfp4 bytes [n_blocks, 17] (quantize_row_mxfp4_ref)."""
    e = mxfp4_exponents(np.abs(blocks).max(axis=-1))
    codes = _best_codes(blocks, e8m0_half(e))
    qs = codes[:, :16] | (codes[:, 16:] << 4)
    return np.concatenate([e[:, None], qs], axis=1)


def power_of_two_prescale(amax: float) -> float:
    """A power of two that brings a tensor's largest |value| to within [1344, 2688] (E2M1 6 × E4M3 448 is 2688), so
    ggml's NVFP4 quantizer, which has no per-tensor scale, uses normal E4M3 scales; multiplying by it is exact."""
    if not (amax > 0 and np.isfinite(amax)):
        return 1.0
    return float(2.0 ** np.floor(np.log2(2688.0 / amax)))
