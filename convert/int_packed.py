"""Packed-integer weights (compressed-tensors pack-quantized, GPTQ, AWQ): unpacked to codes, zero points and scales,
then decoded to float32 or rewritten as ggml's Q4_0 / Q4_1 / Q8_0 blocks.

Every format reduces to value = (code − zero) · scale, with unsigned codes, an integer zero point and a scale per
(row, group). ggml's blocks hold one F16 scale per 32 values, so a group of 128 (or a whole row) becomes 4 (or n/32)
blocks that reuse its scale:

- symmetric 4-bit (zero 8): Q4_0, d = scale, its nibbles the codes as stored — exact when the scale is an F16 number
  (F16 and BF16 scales of ordinary size are; F32 scales are rounded to F16, counted in `Rounding`);
- asymmetric 4-bit: Q4_1, d = scale, m = −zero · scale (value = nibble · d + m) — m rounded to F16 where it needs
  more than F16's 11 bits;
- symmetric 8-bit (zero 128): Q8_0, qs = code − 128.

The code is stored with an offset of 2^(bits−1) by compressed-tensors (its signed value + 8) and as is by GPTQ/AWQ;
GPTQ's v1 format stores zero − 1.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .quantized import Q

AWQ_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])   # column c of 8 sits in nibble AWQ_ORDER[c] (AutoAWQ's packing)


def unpack_words(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 [..., w] holding values densely from the least significant bit -> uint8 [..., w · 32/bits]."""
    raw = np.ascontiguousarray(words).view(np.uint8)   # little-endian words: their bytes in value order
    if bits == 8:
        return raw.copy()
    per_byte = 8 // bits
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = (raw[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*raw.shape[:-1], raw.shape[-1] * per_byte)


@dataclass
class Rounding:
    """Scales that F16 could not hold exactly (tensor count and the largest relative change), for the report."""
    tensors: set[str] = field(default_factory=set)
    worst: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, name: str, exact: np.ndarray, stored: np.ndarray) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.abs(stored.astype(np.float64) - exact) / np.abs(exact)
        change = change[np.isfinite(change)]
        if change.size and change.max() > 0:
            with self.lock:
                self.tensors.add(name)
                self.worst = max(self.worst, float(change.max()))


@dataclass
class IntRows:
    """Rows of a packed-integer weight: value[r, c] = (codes[r, c] − zeros[r, g]) · scales[r, g], g = col_group[c]."""
    codes: np.ndarray        # uint8 [n, in]
    zeros: np.ndarray        # int32 [n, groups]
    scales: np.ndarray       # float32 [n, groups], the stored values exactly
    col_group: np.ndarray    # int [in]

    def decode(self) -> np.ndarray:
        # (code − zero) has at most 9 bits and the scale at most 24: the float32 product is exact for F16/BF16 scales
        diff = self.codes.astype(np.float32) - self.zeros[:, self.col_group].astype(np.float32)
        return diff * self.scales[:, self.col_group]

    def blocks(self, qtype: Q, name: str, rounding: Rounding) -> np.ndarray:
        n, n_in = self.codes.shape
        first = self.col_group[::32]                                # every 32-value block lies in one group
        d = self.scales[:, first].reshape(-1)
        d16 = d.astype(np.float16)
        rounding.note(name, d.astype(np.float64), d16)
        codes = self.codes.reshape(-1, 32)
        head = [d16.reshape(-1, 1).view(np.uint8)]
        if qtype == Q.Q8_0:
            qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        else:
            qs = codes[:, :16] | (codes[:, 16:] << 4)
            if qtype == Q.Q4_1:
                m = -self.zeros[:, first].reshape(-1).astype(np.float64) * d
                m16 = m.astype(np.float16)
                rounding.note(name, m, m16)
                head.append(m16.reshape(-1, 1).view(np.uint8))
        return np.concatenate([*head, qs], axis=1).reshape(n, -1)


def check_zero(rows: IntRows, zero: int, where: str) -> None:
    bad = rows.zeros != zero
    if bad.any():
        raise ValueError(f"{where}: zero point {int(rows.zeros[bad][0])} where a symmetric checkpoint has {zero}")


# ---- the three layouts ---------------------------------------------------------------------------------------------

def intpack_rows(packed: np.ndarray, scales: np.ndarray, zero_codes: np.ndarray | None, n_in: int,
                 bits: int) -> IntRows:
    """compressed-tensors pack-quantized rows: `packed` int32 [n, words], `scales` [n, groups], `zero_codes` the
    unpacked (stored, +2^(bits−1)) zero points [n, groups] or None (symmetric)."""
    codes = unpack_words(packed, bits)[:, :n_in]
    groups = scales.shape[1]
    offset = 1 << (bits - 1)
    zeros = (np.full((len(codes), groups), offset, np.int32) if zero_codes is None
             else zero_codes.astype(np.int32))
    col_group = np.arange(n_in) * groups // n_in
    return IntRows(codes, zeros, scales.astype(np.float32), col_group)


def intpack_zero_codes(packed_zero: np.ndarray, n_rows: int, bits: int) -> np.ndarray:
    """compressed-tensors packs asymmetric zero points along rows: int32 [ceil(n·bits/32), groups] -> [n, groups]."""
    return unpack_words(np.ascontiguousarray(packed_zero.T), bits)[:, :n_rows].T


def gptq_rows(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, cols: np.ndarray,
              bits: int, v2: bool) -> IntRows:
    """Output rows `cols` of a GPTQ weight from whole (in-major) tensors: qweight int32 [in·bits/32, out] packs
    input rows from the least significant bits, qzeros int32 [groups, out·bits/32] packs output columns."""
    codes = unpack_words(np.ascontiguousarray(qweight[:, cols].T), bits)        # [n, in]
    zeros = unpack_words(qzeros, bits)[:, cols].T.astype(np.int32)             # [n, groups]
    if not v2:
        zeros = zeros + 1  # v1 stores zero − 1
    return IntRows(codes, zeros, scales[:, cols].T.astype(np.float32), g_idx.astype(np.int64))


def awq_rows(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, cols: np.ndarray, group: int,
             bits: int) -> IntRows:
    """Output rows `cols` of an AutoAWQ GEMM weight: qweight int32 [in, out·bits/32], 8 output columns per word in
    AWQ_ORDER; qzeros the same along [groups, …]."""
    per_word = 32 // bits
    order = (np.arange(qweight.shape[1] * per_word).reshape(-1, per_word)[:, AWQ_ORDER[:per_word]]).reshape(-1)
    pick = order[cols]
    codes = unpack_words(qweight, bits)[:, pick].T                              # [n, in]
    zeros = unpack_words(qzeros, bits)[:, pick].T.astype(np.int32)
    n_in = qweight.shape[0]
    col_group = np.arange(n_in) // (group or n_in)
    return IntRows(np.ascontiguousarray(codes), zeros, scales[:, cols].T.astype(np.float32), col_group)


__all__ = ["AWQ_ORDER", "IntRows", "Rounding", "awq_rows", "check_zero", "gptq_rows", "intpack_rows",
           "intpack_zero_codes", "unpack_words"]
