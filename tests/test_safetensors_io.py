"""The safetensors reader: exact values for every dtype and FP8 convention, row gathers, bounded memory, and a
one-line error naming the file for each malformed input."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import psutil
import pytest

from lcrun.convert.errors import CheckpointError, UnsupportedModelError
from lcrun.convert.fp8 import Fp8Scheme, detect_fp8_scheme
from lcrun.convert.safetensors_io import Checkpoint
from tests.fixtures.safetensors_writer import save_safetensors

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def test_float_dtypes_and_sharded_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal((6, 4)).astype(ml_dtypes.bfloat16)
    c = rng.standard_normal(5).astype(np.float16)
    save_safetensors(tmp_path / "s1.safetensors", {"a.weight": a})
    save_safetensors(tmp_path / "s2.safetensors", {"b.weight": b, "c.weight": c})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors", "c.weight": "s2.safetensors"}}))
    with Checkpoint(tmp_path) as ck:
        assert ck.names == ["a.weight", "b.weight", "c.weight"]
        assert ck.dtype("b.weight") == "BF16" and ck.shape("b.weight") == (6, 4)
        np.testing.assert_array_equal(ck.rows("a.weight", 2, 5), a[2:5])
        got = ck.rows("b.weight", 0, 6)
        assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.view(np.uint16), b.view(np.uint16))
        np.testing.assert_array_equal(ck.rows("c.weight", 1, 4), c[1:4])
        assert ck.raw_bytes("b.weight", 1, 3) == b[1:3].tobytes()
        index = np.array([3, 0, 7, 1, 2, 6, 4, 5])
        np.testing.assert_array_equal(ck.rows("a.weight", 2, 6, index=index), a[index[2:6]])


def _fp8_checkpoint(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_safetensors(tmp_path / "model.safetensors", tensors)
    return tmp_path


def test_fp8_per_tensor_hand_example(tmp_path: Path) -> None:
    weight = np.array([[1.0, -2.0], [0.5, 448.0]], dtype=E4M3)
    _fp8_checkpoint(tmp_path, {"w.weight": weight, "w.weight_scale": np.array(0.25, np.float32),
                               "w.input_scale": np.array(3.0, np.float32)})
    with Checkpoint(tmp_path, {"quant_method": "fp8", "activation_scheme": "static"}) as ck:
        assert ck.names == ["w.weight"]  # scales are consumed, the activation scale dropped
        np.testing.assert_array_equal(ck.rows("w.weight", 0, 2), [[0.25, -0.5], [0.125, 112.0]])


def test_fp8_fbgemm_per_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.uniform(-400, 400, (6, 8)).astype(E4M3)
    scale = rng.uniform(0.001, 0.01, (6, 1)).astype(np.float32)
    _fp8_checkpoint(tmp_path, {"m.weight": weight, "m.weight_scale": scale})
    with Checkpoint(tmp_path, {"quant_method": "fbgemm_fp8"}) as ck:
        expected = weight.astype(np.float32) * scale
        np.testing.assert_array_equal(ck.rows("m.weight", 0, 6), expected)
        index = np.array([5, 4, 3, 2, 1, 0])
        np.testing.assert_array_equal(ck.rows("m.weight", 1, 4, index=index), expected[index[1:4]])


def test_fp8_compressed_tensors_channel_with_zero_point(tmp_path: Path) -> None:
    weight = np.array([[2.0, 4.0], [8.0, 16.0], [1.0, 3.0]], dtype=E4M3)
    scale = np.array([[0.5], [0.25], [2.0]], np.float32)
    zero = np.array([[1.0], [0.0], [-1.0]], np.float32)
    _fp8_checkpoint(tmp_path, {"l.weight": weight, "l.weight_scale": scale, "l.weight_zero_point": zero})
    with Checkpoint(tmp_path, {"quant_method": "compressed-tensors", "format": "float-quantized"}) as ck:
        np.testing.assert_array_equal(ck.rows("l.weight", 0, 3), [[0.5, 1.5], [2.0, 4.0], [4.0, 8.0]])


@pytest.mark.parametrize("config", [
    {"quant_method": "fp8", "weight_block_size": [128, 128]},                       # weight_scale_inv (DeepSeek/Qwen)
    {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {      # compressed-tensors block
        "num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}}}},
])
def test_fp8_block_scales(tmp_path: Path, config: dict) -> None:
    rng = np.random.default_rng(2)
    weight = rng.uniform(-448, 448, (200, 300)).astype(E4M3)
    scale = rng.uniform(0.001, 0.01, (2, 3)).astype(np.float32)
    name = "weight_scale_inv" if config["quant_method"] == "fp8" else "weight_scale"
    _fp8_checkpoint(tmp_path, {"b.weight": weight, f"b.{name}": scale})
    expected = weight.astype(np.float32).copy()
    for i in range(2):
        for j in range(3):
            expected[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= scale[i, j]
    with Checkpoint(tmp_path, config) as ck:
        np.testing.assert_array_equal(ck.rows("b.weight", 100, 200), expected[100:200])


def test_e5m2_and_e4m3_nan_encodings(tmp_path: Path) -> None:
    e5 = np.array([[1.5, -57344.0]], dtype=E5M2)
    e4_bits = np.array([[0x7F, 0xFF, 0x38, 0x00]], dtype=np.uint8)  # NaN, NaN, 1.0, 0.0
    _fp8_checkpoint(tmp_path, {"a.weight": e5, "a.weight_scale": np.array([2.0], np.float32),
                               "b.weight": e4_bits.view(E4M3), "b.weight_scale": np.array([1.0], np.float32)})
    with Checkpoint(tmp_path, {"quant_method": "fp8"}) as ck:
        np.testing.assert_array_equal(ck.rows("a.weight", 0, 1), [[3.0, -114688.0]])
        b = ck.rows("b.weight", 0, 1)[0]
        assert np.isnan(b[0]) and np.isnan(b[1]) and b[2] == 1.0 and b[3] == 0.0


def test_fp8_weight_without_scale(tmp_path: Path) -> None:
    _fp8_checkpoint(tmp_path, {"a.weight": np.ones((2, 2), E4M3)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: FP8 tensor a\.weight has no weight_scale"):
        Checkpoint(tmp_path, {"quant_method": "fp8"})


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_unsupported_quant_method(tmp_path: Path, method: str) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: quant_method '{method}'"):
        detect_fp8_scheme({"quant_method": method}, tmp_path / "config.json")
    assert detect_fp8_scheme({"quant_method": "fp8"}, tmp_path / "config.json") == Fp8Scheme("per_tensor")


def _valid_file(path: Path) -> None:
    save_safetensors(path, {"a.weight": np.arange(64, dtype=np.float32).reshape(8, 8)})


def test_header_length_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length 10000 runs past the end"):
        Checkpoint(tmp_path)


def test_too_short(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        Checkpoint(tmp_path)


def test_malformed_header_json(tmp_path: Path) -> None:
    raw = b"{not json}"
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header is not valid JSON"):
        Checkpoint(tmp_path)


def test_data_offsets_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _valid_file(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor a\.weight: data offsets \[0, 256\] run past"):
        Checkpoint(tmp_path)


def test_size_disagreeing_with_shape(tmp_path: Path) -> None:
    header = json.dumps({"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(CheckpointError, match=r"tensor a\.weight: 32 bytes of data for shape \[4, 4\]"):
        Checkpoint(tmp_path)


def test_unsupported_weight_dtype(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "model.safetensors", {"a.weight": np.zeros((2, 2), np.int64)})
    with pytest.raises(UnsupportedModelError, match=r"model\.safetensors: tensor a\.weight has dtype I64"):
        Checkpoint(tmp_path)


def test_missing_shard_and_inconsistent_index(tmp_path: Path) -> None:
    _valid_file(tmp_path / "s1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: names shard s2\.safetensors, which is missing"):
        Checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a.weight": "s1.safetensors", "z.weight": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"says tensor z\.weight is in s1\.safetensors"):
        Checkpoint(tmp_path)


def test_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin"):
        Checkpoint(tmp_path)


def test_reading_in_chunks_keeps_resident_memory_bounded(tmp_path: Path) -> None:
    rows, cols = 4096, 4096  # 64 MiB of float32
    path = tmp_path / "model.safetensors"
    header = json.dumps({"big.weight": {"dtype": "F32", "shape": [rows, cols],
                                        "data_offsets": [0, rows * cols * 4]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        chunk = np.random.default_rng(0).standard_normal((256, cols)).astype(np.float32).tobytes()
        for _ in range(rows // 256):
            f.write(chunk)
    process = psutil.Process()
    with Checkpoint(tmp_path) as ck:
        before = process.memory_info().rss
        peak = before
        for start in range(0, rows, 256):  # 4 MiB chunks
            data = ck.rows("big.weight", start, start + 256)
            assert data.shape == (256, cols)
            del data
            peak = max(peak, process.memory_info().rss)
        growth = peak - before
    assert growth < 24 << 20, f"resident memory grew by {growth >> 20} MiB reading a 64 MiB tensor"


def test_negative_control_without_releasing_pages_memory_grows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound above is not vacuous: with page release disabled, the same read keeps the whole tensor resident."""
    from lcrun.convert import safetensors_io
    monkeypatch.setattr(safetensors_io._Shard, "release", lambda self, start, stop: None)
    with pytest.raises(AssertionError, match="resident memory grew"):
        test_reading_in_chunks_keeps_resident_memory_bounded(tmp_path)
