"""Byte identity: our Q8_0 / Q4_0 encodings equal ggml's own quantizer (llama.cpp's llama_model_quantize) on the
same float32 data, including the ties and edge cases where a different rounding rule would show."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from lcrun.convert.gguf_out import GGUFOutput
from lcrun.convert.quants import Q, encode_rows, tensor_nbytes
from lcrun.engine import quantize_gguf
from tests.fixtures.gguf_llama import add_llama_hparams

HIDDEN, FFN, VOCAB, HEADS = 64, 128, 96, 2


def _crafted_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random normals plus rows made to hit rounding ties, zero blocks, sign-of-max cases and tiny values."""
    data = rng.standard_normal((rows, cols)).astype(np.float32)
    data[0] = 0.0                                                    # all-zero blocks: d = 0
    data[1, :32] = np.arange(-16, 16, dtype=np.float32) + 0.5         # Q8_0 ties after scaling (amax 15.5)
    data[1, 0] = 127.0                                               # amax 127 → d = 1, so x*id keeps the .5 ties
    data[2, :32] = np.linspace(-8, 7.5, 32, dtype=np.float32)         # Q4_0: max magnitude is negative (-8 → d = 1)
    data[3, :32] = 8.0; data[3, 5] = -8.0                             # equal magnitudes: ggml keeps the first one
    data[4] *= np.float32(1e-30)                                      # subnormal-scale values
    data[5, :32] = rng.integers(-7, 8, 32).astype(np.float32) - 0.5   # Q4_0 ties at x + 8.5
    data[5, 0] = -8.0
    return data


def _write_f32_llama(path: Path, tensors: dict[str, np.ndarray]) -> None:
    out = GGUFOutput(path, "llama")
    w = out.writer
    add_llama_hparams(w, n_ctx=256, n_embd=HIDDEN, n_layer=1, n_ff=FFN, n_head=HEADS, n_head_kv=HEADS,
                      head_dim=HIDDEN // HEADS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, data in tensors.items():
        out.add_tensor(name, data.shape, Q.F32, data.nbytes)
    out.open()
    for data in tensors.values():
        out.write(data.tobytes())
    out.commit()


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (HIDDEN, HIDDEN), "blk.0.attn_v.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN), "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    tensors = {n: (_crafted_rows(rng, *s) if len(s) == 2 else np.ones(s, np.float32)) for n, s in shapes.items()}
    path = tmp_path_factory.mktemp("quant") / "f32.gguf"
    _write_f32_llama(path, tensors)
    return path, tensors


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_own_quantization_is_byte_identical_to_ggml(f32_model, tmp_path: Path, qtype: Q) -> None:
    src, tensors = f32_model
    dst = tmp_path / f"{qtype.name}.gguf"
    quantize_gguf(src, dst, qtype.name, threads=1, pure=True)
    reader = gguf.GGUFReader(dst)
    compared = 0
    for tensor in reader.tensors:
        if len(tensors[tensor.name].shape) == 1:
            assert tensor.tensor_type == Q.F32
            continue
        assert tensor.tensor_type == qtype, tensor.name
        ours = encode_rows(tensors[tensor.name], qtype)
        assert len(ours) == tensor_nbytes(qtype, tensors[tensor.name].shape)
        assert bytes(ours) == tensor.data.tobytes(), f"{tensor.name} differs from ggml's {qtype.name}"
        compared += 1
    assert compared == 9


def test_negative_control_half_even_rounding_is_detected(f32_model) -> None:
    """numpy's default rounding (half to even) must differ from ggml on the crafted ties: the comparison above
    is not vacuous."""
    _src, tensors = f32_model
    blocks = tensors["blk.0.attn_q.weight"][1, :32]
    d = np.abs(blocks).max() / np.float32(127)
    half_even = np.round(blocks * (np.float32(1) / d)).astype(np.int8)
    ours = np.frombuffer(bytes(encode_rows(blocks.reshape(1, 32), Q.Q8_0)), dtype=np.int8)[2:]
    assert not np.array_equal(half_even, ours)


def test_float_encodings_round_trip() -> None:
    rows = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    assert np.frombuffer(bytes(encode_rows(rows, Q.F32)), np.float32).tolist() == rows.ravel().tolist()
    f16 = np.frombuffer(bytes(encode_rows(rows, Q.F16)), np.float16)
    assert np.array_equal(f16, rows.ravel().astype(np.float16))
    import ml_dtypes
    bf16 = np.frombuffer(bytes(encode_rows(rows, Q.BF16)), ml_dtypes.bfloat16)
    assert np.array_equal(bf16.astype(np.float32), rows.ravel().astype(ml_dtypes.bfloat16).astype(np.float32))
