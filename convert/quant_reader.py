"""A quantized weight's rows, read out of the checkpoint: decoded to float32, or as the ggml blocks that hold them.

The small companion tensors (a global scale, weight_shape, g_idx, packed zero points) are read and checked when the
checkpoint is opened, so bad input is refused before anything is written. Row-major formats (FP4,
pack-quantized) read just the rows asked for; GPTQ and AWQ store the weight transposed (input-major), so a run of
output rows is a column slice of the whole packed tensor, which is read once and kept (the checkpoint caches the last
few) — a packed int4 tensor is an eighth of its float32 size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import fp4
from .errors import CheckpointError
from .int_packed import IntRows, Rounding, awq_rows, check_zero, gptq_rows, intpack_rows, intpack_zero_codes
from .quantized import Header, Q, QuantSource

ReadRows = Callable[[str, np.ndarray], np.ndarray]   # (tensor name, row ids) -> those rows, in the stored dtype
ReadWhole = Callable[[str], np.ndarray]              # tensor name -> the whole tensor, in the stored dtype


class QuantReader:
    def __init__(self, source: QuantSource, headers: dict[str, Header], read_rows: ReadRows,
                 read_whole: ReadWhole) -> None:
        self.headers = headers
        self._rows, self._whole = read_rows, read_whole
        self.factor: float | None = None          # NVFP4's per-tensor multiplier, `<weight>.scale` in the GGUF
        self._zero_codes: np.ndarray | None = None
        self._g_idx: np.ndarray | None = None
        self.source = source
        self.source = self._check(source)

    def _fail(self, role: str, problem: str) -> CheckpointError:
        name = self.source.parts[role]
        return CheckpointError(self.headers[name].file, f"{name}: {problem}")

    # ---- checks on open --------------------------------------------------------------------------------------------
    def _check(self, src: QuantSource) -> QuantSource:
        if src.kind == "nvfp4":
            value = float(np.asarray(self._whole(src.parts["global"]), dtype=np.float32).reshape(-1)[0])
            if not (np.isfinite(value) and value > 0):
                raise self._fail("global", f"global scale is {value}; it must be a finite number > 0")
            self.factor = float(np.float32(1) / np.float32(value)) if src.global_divides else value
        elif src.kind == "intpack":
            src = self._check_weight_shape(src)
            if not src.symmetric:
                zero = self._whole(src.parts["zero"])
                self._zero_codes = intpack_zero_codes(zero, src.shape[0], src.bits)
        elif src.kind == "gptq":
            src = self._check_g_idx(src)
        return src

    def _check_weight_shape(self, src: QuantSource) -> QuantSource:
        shape = tuple(int(v) for v in np.asarray(self._whole(src.parts["shape"])).reshape(-1))
        words = self.headers[src.parts["packed"]].shape[1]
        fits = len(shape) == 2 and shape[0] == src.shape[0] and -(-shape[1] * src.bits // 32) == words
        if not fits:
            raise self._fail("packed", f"{src.shape[0]} rows of {words} int32 words hold {words * 32 // src.bits} "
                                       f"{src.bits}-bit values each, but weight_shape says {list(shape)}")
        groups = self.headers[src.parts["scale"]].shape[1]
        if shape[1] % groups:
            raise self._fail("scale", f"{groups} scales per row do not divide the {shape[1]} values of a row")
        group = 0 if groups == 1 else shape[1] // groups
        return dataclasses.replace(src, shape=(shape[0], shape[1]), group=group)

    def _check_g_idx(self, src: QuantSource) -> QuantSource:
        groups = self.headers[src.parts["scale"]].shape[0]
        n_in = src.shape[1]
        natural = np.arange(n_in) // (src.group or n_in)
        if "g_idx" not in src.parts:
            self._g_idx = natural
            return dataclasses.replace(src, g_idx=False)
        g_idx = np.asarray(self._whole(src.parts["g_idx"])).astype(np.int64).reshape(-1)
        bad = (g_idx < 0) | (g_idx >= groups)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._fail("g_idx", f"g_idx[{i}] = {int(g_idx[i])} is outside the {groups} groups of scales")
        self._g_idx = g_idx
        # activation order makes groups interleave; a sorted g_idx (desc_act false, or static groups) does not
        return dataclasses.replace(src, g_idx=not np.array_equal(g_idx, natural))

    # ---- data ------------------------------------------------------------------------------------------------------
    def _fp4(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = self.source
        codes = fp4.unpack_codes(self._rows(src.parts["packed"], ids).view(np.uint8))
        scale = self._rows(src.parts["scale"], ids).view(np.uint8)
        if src.kind == "mxfp4":
            if (scale == 0xFF).any():
                raise self._fail("scale", "an E8M0 scale is 0xFF (NaN)")
            return codes, scale
        if ((scale & 0x7F) == fp4.E4M3_NAN).any():
            raise self._fail("scale", "an E4M3 scale is NaN (0x7F or 0xFF)")
        negative = (scale & 0x80) != 0
        if negative.any():
            # ggml reads the scale unsigned: a negative scale is carried as its magnitude with the codes' signs flipped
            codes ^= np.repeat(negative, fp4.NVFP4_GROUP, axis=1).astype(np.uint8) << 3
            scale = scale & 0x7F
        return codes, scale

    def _int(self, ids: np.ndarray) -> IntRows:
        src = self.source
        if src.kind == "intpack":
            packed = self._rows(src.parts["packed"], ids)
            scales = self._rows(src.parts["scale"], ids).astype(np.float32)
            zero = None if self._zero_codes is None else self._zero_codes[ids]
            return intpack_rows(packed, scales, zero, src.shape[1], src.bits)
        qweight, qzeros = self._whole(src.parts["packed"]), self._whole(src.parts["zero"])
        scales = self._whole(src.parts["scale"]).astype(np.float32)
        if src.kind == "gptq":
            assert self._g_idx is not None
            return gptq_rows(qweight, qzeros, scales, self._g_idx, ids, src.bits, src.gptq_v2)
        return awq_rows(qweight, qzeros, scales, ids, src.group, src.bits)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The weight's rows `ids`, decoded to float32 (NVFP4 with its per-tensor factor applied)."""
        if self.source.kind in ("nvfp4", "mxfp4"):
            codes, scale = self._fp4(ids)
            if self.source.kind == "mxfp4":
                return fp4.mxfp4_values(codes, scale)
            return fp4.nvfp4_values(codes, scale) * np.float32(self.factor)
        return self._int(ids).decode()

    def blocks(self, ids: np.ndarray, qtype: Q, rounding: Rounding) -> np.ndarray:
        """The rows `ids` as ggml blocks of `qtype` (the source's exact_type)."""
        src = self.source
        if qtype == Q.NVFP4:
            return fp4.nvfp4_blocks(*self._fp4(ids))
        if qtype == Q.MXFP4:
            return fp4.mxfp4_blocks(*self._fp4(ids))
        rows = self._int(ids)
        if qtype in (Q.Q4_0, Q.Q8_0):
            try:
                check_zero(rows, 1 << (src.bits - 1), src.name)
            except ValueError as exc:
                raise self._fail("zero" if "zero" in src.parts else "packed", str(exc).split(": ", 1)[1]) from None
        return rows.blocks(qtype, src.name, rounding)
