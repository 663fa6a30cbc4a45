"""FP4 against ggml itself: our NVFP4/MXFP4 quantizers equal ggml's `quantize_row_{nvfp4,mxfp4}_ref` byte for byte,
and the blocks we repack from checkpoint layout decode, through ggml's own `dequantize_row_*`, to exactly the
checkpoint's values. The oracle is the libggml-base that llama-cpp-python ships, called through ctypes
(tests/fixtures/ggml_ref.py); gguf's `quants` module (which quantizes MXFP4 but not NVFP4) is checked beside it."""
from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np
import pytest

from lcrun.convert import fp4
from lcrun.convert.quants import Q, encode_rows
from tests.fixtures import ggml_ref


def _crafted(rng: np.random.Generator) -> np.ndarray:
    """Rows of 64 values: every magnitude from subnormal E4M3 scales to saturation, and the blocks where a different
    rounding rule, tie-break, nibble order or log2 rounding would show."""
    rows = [rng.standard_normal((400, 64)) * 10.0 ** rng.uniform(-7, 4, (400, 1))]
    edge = np.zeros((12, 64))
    edge[1] = -0.0                                                # negative zeros: code 0, never 8
    edge[2, :16] = np.arange(16) * 0.25                           # NVFP4 ties between codes (amax 3.75 → d 0.3125)
    edge[3, :16] = -np.arange(16) * 0.25
    edge[4] = 6 * 448                                             # the largest NVFP4 block, exactly
    edge[5] = 1e30                                                # saturates at UE4M3 0x7E
    edge[6] = rng.standard_normal(64) * 1e-4                      # subnormal UE4M3 scales (amax/6 < 2^-6)
    edge[7] = rng.standard_normal(64) * 1e-7                      # scales that round to 0
    edge[8, :32] = np.float32(2.0 ** -4) * np.float32(1 - 2 ** -24)   # log2f rounds up to −4: floor differs from
    edge[8, 32:] = np.float32(2.0 ** 5) * np.float32(1 - 2 ** -24)    # frexp's exact exponent
    edge[9] = np.repeat([0.5, 1, 2, 4], 16)                       # exact powers of two
    edge[10, ::2] = 1.0                                           # ties between 0 and the smallest code
    edge[10, 1::2] = 1 / 12
    edge[11] = np.linspace(-7, 7, 64)
    rows.append(edge)
    return np.concatenate(rows).astype(np.float32)


@pytest.fixture(scope="module")
def crafted() -> np.ndarray:
    return _crafted(np.random.default_rng(11))


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_quantizer_is_byte_identical_to_ggml(crafted: np.ndarray, kind: str) -> None:
    qtype = Q.NVFP4 if kind == "nvfp4" else Q.MXFP4
    ours = bytes(encode_rows(crafted, qtype))
    assert ours == ggml_ref.quantize(kind, crafted)
    if kind == "mxfp4":  # gguf's own MXFP4 quantizer agrees too (it has no NVFP4 quantizer)
        assert ours == gguf.quants.quantize(crafted.reshape(-1, 32), qtype).tobytes()


def test_negative_controls_differ_from_ggml_on_the_crafted_blocks(crafted: np.ndarray) -> None:
    """Rules that look equivalent and are not: each differs from ggml on the crafted rows, so the byte comparison
    above can fail."""
    blocks = crafted.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        exact_floor = np.where(amax > 0, np.frexp(amax)[1] - 1 - 2 + 127, 0).astype(np.uint8)
    assert not np.array_equal(exact_floor, fp4.mxfp4_exponents(amax))      # log2f's rounding matters
    # the last of equal errors instead of the first: ties go the other way
    sub = crafted.reshape(-1, 16)
    d = fp4.ue4m3_to_fp32_half(fp4.fp32_to_ue4m3(np.abs(sub).max(axis=1) / np.float32(6)))
    err = np.abs(fp4._KVALUES[:8] * d[:, None, None] - np.abs(sub)[..., None])
    last = 7 - err[..., ::-1].argmin(axis=-1)
    assert not np.array_equal(last, fp4._best_codes(sub, d) & 7)


def _checkpoint_fp4(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random stored NVFP4 data: packed codes, E4M3 scale bytes (some negative, some subnormal), and the values."""
    codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    scale = rng.uniform(-300, 300, (rows, cols // 16)).astype(ml_dtypes.float8_e4m3fn)
    scale[0, 0] = np.float32(2.0 ** -9)   # the smallest subnormal
    scale_bytes = scale.view(np.uint8)
    values = fp4.E2M1[codes] * np.repeat(scale.astype(np.float32), 16, axis=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale_bytes, values


def test_nvfp4_repack_decodes_to_the_checkpoint_values_in_ggml() -> None:
    packed, scale_bytes, values = _checkpoint_fp4(np.random.default_rng(3), 6, 256)
    codes = fp4.unpack_codes(packed)
    negative = (scale_bytes & 0x80) != 0
    assert negative.any()
    codes ^= np.repeat(negative, 16, axis=1).astype(np.uint8) << 3      # as the reader carries negative scales
    blocks = fp4.nvfp4_blocks(codes, scale_bytes & 0x7F)
    assert np.array_equal(ggml_ref.dequantize("nvfp4", blocks), values.reshape(-1))
    assert np.array_equal(gguf.quants.dequantize(blocks, Q.NVFP4).reshape(-1), values.reshape(-1))
    # negative control: the checkpoint's pairs (2i, 2i+1) copied as ggml's (j, j+8) decode to other values
    unordered = np.concatenate([scale_bytes.reshape(6, -1, 4) & 0x7F, packed.reshape(6, -1, 32)], axis=-1)
    assert not np.array_equal(ggml_ref.dequantize("nvfp4", unordered), values.reshape(-1))


def test_mxfp4_repack_decodes_to_the_checkpoint_values_in_ggml() -> None:
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, (5, 128), dtype=np.uint8)
    exps = rng.integers(0, 255, (5, 4), dtype=np.uint8)      # every E8M0 but NaN, including 2^-127
    exps[0, 0] = 0
    values = fp4.mxfp4_values(codes, exps)
    blocks = fp4.mxfp4_blocks(codes, exps)
    assert np.array_equal(ggml_ref.dequantize("mxfp4", blocks), values.reshape(-1))
    assert np.array_equal(gguf.quants.dequantize(blocks, Q.MXFP4).reshape(-1), values.reshape(-1))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    unordered = np.concatenate([exps.reshape(5, 4, 1), packed.reshape(5, 4, 16)], axis=-1)
    assert not np.array_equal(ggml_ref.dequantize("mxfp4", unordered), values.reshape(-1))


def test_prescale_keeps_nvfp4_scales_normal() -> None:
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) * 0.01   # Llama-sized weights
    k = fp4.power_of_two_prescale(float(np.abs(w).max()))
    assert np.log2(k) == int(np.log2(k)) and 1344 <= np.abs(w).max() * k <= 2688
    ue = fp4.fp32_to_ue4m3(np.abs(w * k).reshape(-1, 16).max(axis=1) / 6)
    assert ((ue >> 3) > 0).all()                       # every scale normal
    plain = fp4.fp32_to_ue4m3(np.abs(w).reshape(-1, 16).max(axis=1) / 6)
    assert ((plain >> 3) == 0).all()                   # without it, every one subnormal
