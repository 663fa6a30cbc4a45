"""The safetensors reader on real files: layout, exact round trips, the FP8 conventions of MODEL_FACTS, one-line errors
naming the file, thread safety and bounded resident memory."""
from __future__ import annotations

import json
import math
import mmap
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lcrun.convert import safetensors_io
from lcrun.convert.errors import CheckpointError, UnsupportedModelError
from lcrun.convert.fp8 import Fp8Scheme
from lcrun.convert.quant_config import detect_scheme
from lcrun.convert.safetensors_io import INDEX_NAME, Checkpoint
from tests.fixtures.one_line_errors import assert_one_line_message
from tests.fixtures.safetensors_writer import save_safetensors, write_raw_safetensors

E4M3 = ml_dtypes.float8_e4m3fn
E5M2 = ml_dtypes.float8_e5m2
BF16 = ml_dtypes.bfloat16


def _e4m3(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite E4M3 values: every byte but the NaN encodings 0x7F / 0xFF."""
    magnitude = rng.integers(0, 0x7F, size=shape, dtype=np.uint8)
    sign = rng.integers(0, 2, size=shape, dtype=np.uint8) << 7
    return (magnitude | sign).view(E4M3)


def _write_index(model_dir: Path, weight_map: dict[str, str]) -> None:
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (model_dir / INDEX_NAME).write_text(json.dumps(index), encoding="utf-8")


def _read_all(ckpt: Checkpoint, name: str, step: int = 7, index: np.ndarray | None = None) -> np.ndarray:
    n = ckpt.shape(name)[0]
    return np.concatenate([ckpt.rows(name, a, min(a + step, n), index=index) for a in range(0, n, step)])


# ---- layout ----------------------------------------------------------------------------------------------------------

def test_single_file_lists_tensors_in_file_order(tmp_path: Path) -> None:
    tensors = {"b.weight": np.ones((3, 4), np.float32), "a.weight": np.zeros(5, np.float16),
               "c.weight": np.ones((2, 2), BF16)}
    save_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.names == ["b.weight", "a.weight", "c.weight"]
        assert [ckpt.dtype(n) for n in ckpt.names] == ["F32", "F16", "BF16"]
        assert ckpt.shape("b.weight") == (3, 4)
        assert ckpt.nbytes("b.weight") == 48 and ckpt.nbytes("a.weight") == 10
        assert ckpt.file_of("c.weight") == tmp_path / "model.safetensors"
        assert not ckpt.is_fp8("b.weight")


def test_sharded_checkpoint_follows_the_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first = {"model.embed_tokens.weight": rng.standard_normal((6, 4)).astype(np.float32),
             "model.layers.0.mlp.up_proj.weight": rng.standard_normal((3, 4)).astype(np.float32)}
    second = {"model.norm.weight": rng.standard_normal(4).astype(np.float32),
              "stray.weight": np.zeros(2, np.float32)}  # in a shard, but not in the index: not part of the model
    save_safetensors(tmp_path / "model-00001-of-00002.safetensors", first)
    save_safetensors(tmp_path / "model-00002-of-00002.safetensors", second)
    _write_index(tmp_path, {**{n: "model-00001-of-00002.safetensors" for n in first},
                            "model.norm.weight": "model-00002-of-00002.safetensors"})
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.names == [*first, "model.norm.weight"]
        assert ckpt.file_of("model.norm.weight").name == "model-00002-of-00002.safetensors"
        for name, value in {**first, "model.norm.weight": second["model.norm.weight"]}.items():
            assert np.array_equal(ckpt.rows(name, 0, value.shape[0]), value)


def test_rows_slices_and_gathers(tmp_path: Path) -> None:
    value = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    bias = np.arange(9, dtype=np.float32)
    save_safetensors(tmp_path / "model.safetensors", {"w": value, "b": bias})
    # the Q/K permutation of the converter: head_dim 4, 3 heads
    perm = np.arange(12).reshape(3, 2, 2).swapaxes(1, 2).reshape(-1)
    with Checkpoint(tmp_path) as ckpt:
        rows = ckpt.rows("w", 3, 8)
        assert np.array_equal(rows, value[3:8]) and rows.dtype == np.float32
        assert rows.flags.writeable and rows.flags.owndata  # a fresh array, not a view into the map
        assert np.array_equal(_read_all(ckpt, "w", step=4, index=perm), value[perm])
        assert np.array_equal(ckpt.rows("w", 2, 6, index=perm), value[perm[2:6]])
        assert np.array_equal(ckpt.rows("b", 2, 7), bias[2:7])
        assert ckpt.rows("w", 4, 4).shape == (0, 5)
        with pytest.raises(IndexError):
            ckpt.rows("w", 10, 13)
    assert np.array_equal(rows, value[3:8])  # still valid after the maps are closed
    with pytest.raises(ValueError, match="closed"):
        ckpt.rows("w", 0, 1)


def test_bf16_and_f16_round_trip_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 16, size=(33, 17), dtype=np.uint16)  # every pattern class: subnormals, inf, NaN
    bf16, f16 = bits.view(BF16), bits[::-1].copy().view(np.float16)
    save_safetensors(tmp_path / "model.safetensors", {"bf": bf16, "half": f16})
    with Checkpoint(tmp_path) as ckpt:
        out = _read_all(ckpt, "bf", step=5)
        assert out.dtype == BF16 and np.array_equal(out.view(np.uint16), bits)
        assert np.array_equal(_read_all(ckpt, "half").view(np.uint16), f16.view(np.uint16))
        raw = b"".join(bytes(ckpt.raw_bytes("bf", a, min(a + 5, 33))) for a in range(0, 33, 5))
        assert raw == bf16.tobytes()
        assert bytes(ckpt.raw_bytes("half", 3, 9)) == f16[3:9].tobytes()


# ---- FP8 -------------------------------------------------------------------------------------------------------------

def _tiled(q: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """q · scale with one scale per block, tile by tile."""
    expected = np.empty(q.shape, np.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = np.s_[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            expected[tile] = q[tile].astype(np.float32) * scale[i, j]
    return expected


CT_BASE = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed"}


def _ct_config(strategy: str, **weights: object) -> dict:
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                "strategy": strategy, **weights}}
    return {**CT_BASE, "config_groups": {"group_0": group}}


def _fp8_case(kind: str, rng: np.random.Generator) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """(quantization_config, tensors of one linear layer, the float32 weight they decode to)."""
    out, cols = 300, 260  # not multiples of 128: partial blocks at both edges
    q = _e4m3(rng, (out, cols))
    w = "layer.weight"
    if kind == "fbgemm":
        scale = rng.uniform(1e-3, 1e-1, (out, 1)).astype(np.float32)
        return {"quant_method": "fbgemm_fp8"}, {w: q, w + "_scale": scale}, q.astype(np.float32) * scale
    if kind == "autofp8":
        scale = np.array(0.0123, np.float32)
        tensors = {w: q, w + "_scale": scale, "layer.input_scale": np.array(0.5, np.float32)}
        return {"quant_method": "fp8", "activation_scheme": "static"}, tensors, q.astype(np.float32) * scale
    if kind == "ct-tensor":
        scale = np.array([0.0421], np.float32)
        tensors = {w: q, w + "_scale": scale, "layer.input_scale": np.array([0.5], np.float32)}
        return _ct_config("tensor"), tensors, q.astype(np.float32) * scale[0]
    if kind == "ct-channel-zp":
        scale = rng.uniform(1e-3, 1e-1, (out, 1)).astype(np.float32)
        zero_point = _e4m3(rng, (out, 1))
        tensors = {w: q, w + "_scale": scale, w + "_zero_point": zero_point}
        expected = (q.astype(np.float32) - zero_point.astype(np.float32)) * scale
        return _ct_config("channel", symmetric=False), tensors, expected
    if kind == "ct-block":
        scale = rng.uniform(1e-3, 1e-1, (3, 3)).astype(np.float32)
        config = _ct_config("block", block_structure=[128, 128])
        return config, {w: q, w + "_scale": scale}, _tiled(q, scale, (128, 128))
    if kind == "ct-group":
        scale = rng.uniform(1e-3, 1e-1, (out, 5)).astype(BF16)  # scales may be BF16
        config = _ct_config("group", group_size=64)
        return config, {w: q, w + "_scale": scale}, _tiled(q, scale.astype(np.float32), (1, 64))
    if kind == "block-inv":
        scale = rng.uniform(1e-3, 1e-1, (5, 9)).astype(np.float32)
        config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 32]}
        return config, {w: q, w + "_scale_inv": scale}, _tiled(q, scale, (64, 32))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["fbgemm", "autofp8", "ct-tensor", "ct-channel-zp", "ct-block", "ct-group",
                                  "block-inv"])
def test_fp8_conventions_decode_exactly(tmp_path: Path, kind: str) -> None:
    config, tensors, expected = _fp8_case(kind, np.random.default_rng(2))
    save_safetensors(tmp_path / "model.safetensors", {**tensors, "norm.weight": np.ones(4, np.float32)})
    perm = np.arange(300).reshape(-1, 2, 2).swapaxes(1, 2).reshape(-1)
    with Checkpoint(tmp_path, config) as ckpt:
        assert ckpt.names == ["layer.weight", "norm.weight"]  # scales consumed, activation scales dropped
        assert ckpt.is_fp8("layer.weight") and ckpt.dtype("layer.weight") == "F8_E4M3"
        assert ckpt.nbytes("layer.weight") == 300 * 260
        decoded = _read_all(ckpt, "layer.weight", step=37)
        assert decoded.dtype == np.float32 and np.array_equal(decoded, expected)
        assert np.array_equal(_read_all(ckpt, "layer.weight", step=20, index=perm), expected[perm])
        assert bytes(ckpt.raw_bytes("layer.weight", 5, 7)) == tensors["layer.weight"][5:7].tobytes()


def test_fp8_hand_worked_example(tmp_path: Path) -> None:
    # E4M3 (bias 7): 0x38 = 1, 0x40 = 2, 0xB8 = -1, 0x3C = 1.5, 0x7E = 448 (the largest), 0x01 = 2^-9
    q = np.array([[0x38, 0x40, 0xB8], [0x3C, 0x7E, 0x01]], np.uint8).view(E4M3)
    tensors = {"w.weight": q, "w.weight_scale": np.array([[0.5], [2.0]], np.float32),
               "z.weight": q[:1], "z.weight_scale": np.array([[0.5]], np.float32),
               "z.weight_zero_point": np.array([[1.0]], np.float32)}
    save_safetensors(tmp_path / "model.safetensors", tensors)
    with Checkpoint(tmp_path, _ct_config("channel")) as ckpt:
        assert ckpt.rows("w.weight", 0, 2).tolist() == [[0.5, 1.0, -0.5], [3.0, 896.0, 0.00390625]]
        assert ckpt.rows("z.weight", 0, 1).tolist() == [[0.0, 0.5, -1.0]]  # (W - zp) * scale


def test_fp8_nan_encodings_and_e5m2(tmp_path: Path) -> None:
    e4m3 = np.array([[0x7F, 0xFF, 0x7E, 0xFE]], np.uint8).view(E4M3)
    # E5M2 (bias 15): 0x3C = 1, 0x7B = 57344 (the largest finite), 0x7C = inf, 0xC0 = -2
    e5m2 = np.array([[0x3C, 0x7B, 0x7C, 0xC0]], np.uint8).view(E5M2)
    tensors = {"a.weight": e4m3, "a.weight_scale": np.array(2.0, np.float32),
               "b.weight": e5m2, "b.weight_scale": np.array([[0.5]], np.float32)}
    save_safetensors(tmp_path / "model.safetensors", tensors)
    with Checkpoint(tmp_path, {"quant_method": "fp8"}) as ckpt:
        a = ckpt.rows("a.weight", 0, 1)[0]
        assert np.isnan(a[0]) and np.isnan(a[1]) and a[2:].tolist() == [896.0, -896.0]
        assert ckpt.dtype("b.weight") == "F8_E5M2"
        assert ckpt.rows("b.weight", 0, 1)[0].tolist() == [0.5, 28672.0, math.inf, -1.0]


@pytest.mark.parametrize(("config", "expected"), [
    (None, None),
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, Fp8Scheme("fbgemm")),
    ({"quant_method": "fp8", "activation_scheme": "static"}, Fp8Scheme("per_tensor")),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, Fp8Scheme("block", (128, 128), "_scale_inv")),
    (_ct_config("channel"), Fp8Scheme("compressed_tensors")),
    (_ct_config("block", block_structure=[64, 128]), Fp8Scheme("compressed_tensors", (64, 128))),
    (_ct_config("group", group_size=32), Fp8Scheme("compressed_tensors", (1, 32))),
    # the older `compression_config` block, as neuralmagic's mid-2024 uploads carry it
    ({**_ct_config("tensor"), "quant_method": "sparseml", "format": "naive-quantized"},
     Fp8Scheme("compressed_tensors")),
    ({k: v for k, v in _ct_config("tensor").items() if k != "quant_method"}, Fp8Scheme("compressed_tensors")),
])
def test_detect_fp8_scheme(config: dict | None, expected: Fp8Scheme | None) -> None:
    scheme = detect_scheme(config, Path("config.json"))
    assert (scheme.fp8 if scheme else None) == expected


@pytest.mark.parametrize("config", [
    {"quant_method": "gptq", "bits": 3, "group_size": 128},
    {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
    {"quant_method": "bitsandbytes", "load_in_4bit": True},
    {**_ct_config("group", group_size=128), "format": "marlin-24"},
    _ct_config("channel", type="int", num_bits=3),
    {"quant_method": "modelopt", "quant_algo": "INT4_AWQ"},
])
def test_unsupported_quantization_names_config_json(tmp_path: Path, config: dict) -> None:
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, np.float32)})
    with pytest.raises(UnsupportedModelError) as err:
        Checkpoint(tmp_path, config)
    assert str(err.value).startswith(str(tmp_path / "config.json") + ": ")


# ---- errors ----------------------------------------------------------------------------------------------------------

def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes((1 << 20).to_bytes(8, "little") + b'{"w": {}}')
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "header length 1048576", "past the end", subject=path)


def test_file_too_short_for_a_header(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "too short", subject=tmp_path / "model.safetensors")


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}, "run past the end"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "end before they begin"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}, "16 bytes of data for shape [3] of F32 (12 expected)"),
    ({"dtype": "F32", "shape": [4]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "malformed header entry"),
])
def test_bad_data_offsets(tmp_path: Path, entry: dict, fragment: str) -> None:
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, {"w": entry}, bytes(16))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "tensor w", fragment, subject=path)


@pytest.mark.parametrize(("header", "fragment"), [
    (b'{"w": {"dtype": "F32", ', "not valid JSON"),
    (b"\xff\xfe not utf-8", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "names w twice"),
])
def test_malformed_header(tmp_path: Path, header: bytes, fragment: str) -> None:
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, header, bytes(8))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, fragment, subject=path)


def test_missing_shard_named_in_index(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": np.ones(2, np.float32)})
    _write_index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "missing", INDEX_NAME, "(e.g. b)",
                            subject=tmp_path / "model-00002-of-00002.safetensors")


def test_index_names_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "model-00001-of-00001.safetensors", {"a": np.ones(2, np.float32)})
    _write_index(tmp_path, {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"})
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "has no tensor b", subject=tmp_path / "model-00001-of-00001.safetensors")


def test_tensor_in_two_files(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
    save_safetensors(tmp_path / "b.safetensors", {"w": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "tensor w is also in a.safetensors", subject=tmp_path / "b.safetensors")


def test_no_safetensors_files(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "no *.safetensors", "pytorch_model.bin", subject=tmp_path)


@pytest.mark.parametrize(("dtype", "fragment"), [
    (np.int64, "tensor w has dtype I64; weights must be one of F32, F16, BF16, F8_E4M3, F8_E5M2"),
    (np.uint8, "tensor w has dtype U8"),
    (np.float64, "tensor w has dtype F64"),
])
def test_unsupported_weight_dtype(tmp_path: Path, dtype: type, fragment: str) -> None:
    save_safetensors(tmp_path / "model.safetensors", {"ok": np.ones(2, np.float32), "w": np.ones((2, 2), dtype)})
    with pytest.raises(UnsupportedModelError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, fragment, subject=tmp_path / "model.safetensors")


def test_unknown_dtype_code(tmp_path: Path) -> None:
    write_raw_safetensors(tmp_path / "model.safetensors", {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
                          bytes(1))
    with pytest.raises(UnsupportedModelError) as err:
        Checkpoint(tmp_path)
    assert_one_line_message(err.value, "tensor w has dtype F4", subject=tmp_path / "model.safetensors")


def test_fp8_weight_without_scale(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "model.safetensors", {"mlp.weight": _e4m3(np.random.default_rng(0), (4, 4)),
                                                      "mlp.input_scale": np.array(1.0, np.float32)})
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path, {"quant_method": "fbgemm_fp8"})
    assert_one_line_message(err.value, "FP8 tensor mlp.weight has no weight_scale",
                            subject=tmp_path / "model.safetensors")


@pytest.mark.parametrize(("scale", "error", "fragment"), [
    (np.ones((3, 1), np.float32), CheckpointError, "shape [3, 1] fits neither per-tensor, per-row nor 128x128 blocks"),
    (np.ones((4, 1), np.int8), UnsupportedModelError, "FP8 scale mlp.weight_scale has dtype I8"),
])
def test_fp8_scale_that_does_not_fit(tmp_path: Path, scale: np.ndarray, error: type, fragment: str) -> None:
    save_safetensors(tmp_path / "model.safetensors", {"mlp.weight": _e4m3(np.random.default_rng(0), (4, 4)),
                                                      "mlp.weight_scale": scale})
    with pytest.raises(error) as err:
        Checkpoint(tmp_path, {"quant_method": "fbgemm_fp8"})
    assert_one_line_message(err.value, fragment, subject=tmp_path / "model.safetensors")


# ---- concurrency and memory ------------------------------------------------------------------------------------------

def test_two_threads_read_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    big = rng.standard_normal((512, 256)).astype(BF16)
    config, tensors, expected = _fp8_case("block-inv", rng)
    save_safetensors(tmp_path / "a.safetensors", {"big": big})
    save_safetensors(tmp_path / "b.safetensors", tensors)
    failures: list[str] = []

    def read(name: str, want: np.ndarray, offset: int) -> None:
        n = want.shape[0]
        for i in range(300):
            a = (offset + 13 * i) % (n - 9)
            if not np.array_equal(ckpt.rows(name, a, a + 9).view(np.uint8), want[a:a + 9].view(np.uint8)):
                failures.append(f"{name} rows {a}:{a + 9}")

    with Checkpoint(tmp_path, config) as ckpt:
        threads = [threading.Thread(target=read, args=args) for args in
                   [("big", big, 0), ("big", big, 5), ("layer.weight", expected, 3)]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures


def _rss() -> int:
    psutil = pytest.importorskip("psutil")
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("big")
    value = np.arange(4096 * 4096, dtype=np.float32).reshape(4096, 4096)  # 64 MiB
    save_safetensors(model_dir / "model.safetensors", {"w": value})
    return model_dir


def _rss_growth_reading(model_dir: Path) -> int:
    """Peak growth of resident memory while reading the 64 MiB tensor in 2 MiB chunks."""
    with Checkpoint(model_dir) as ckpt:
        ckpt.rows("w", 0, 128)  # let allocator and page tables settle before the baseline
        base = peak = _rss()
        for a in range(0, 4096, 128):
            rows = ckpt.rows("w", a, a + 128)
            assert rows[0, 0] == a * 4096 and rows[-1, -1] == (a + 128) * 4096 - 1
            del rows
            peak = max(peak, _rss())
    return peak - base


needs_madvise = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"),
                                   reason="page release is measured on Linux, where MADV_DONTNEED drops mapped pages")


@needs_madvise
def test_reading_chunk_by_chunk_keeps_resident_memory_bounded(big_checkpoint: Path) -> None:
    assert _rss_growth_reading(big_checkpoint) < 16 << 20


@needs_madvise
def test_without_page_release_resident_memory_grows(big_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the control for the test above: with the release disabled the mapped pages stay resident
    monkeypatch.setattr(safetensors_io, "_release", lambda *args: None)
    assert _rss_growth_reading(big_checkpoint) > 48 << 20


# ---- the reference library -------------------------------------------------------------------------------------------

def test_agrees_with_the_safetensors_library(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(4)
    tensors = {"f32": rng.standard_normal((5, 3)).astype(np.float32), "f16": rng.standard_normal(7).astype(np.float16),
               "bf16": rng.standard_normal((4, 2)).astype(BF16), "fp8.weight": _e4m3(rng, (3, 4)),
               "fp8.weight_scale": np.array([[0.5], [0.25], [2.0]], np.float32)}
    (tmp_path / "lib").mkdir()
    st.save_file(tensors, str(tmp_path / "lib" / "model.safetensors"), metadata={"format": "pt"})
    # the library writes FP8 from ml_dtypes arrays but cannot load it back (it looks for np.float8_e4m3fn)
    floats = {n: v for n, v in tensors.items() if not n.startswith("fp8")}
    save_safetensors(tmp_path / "floats.safetensors", floats)
    loaded = st.load_file(str(tmp_path / "floats.safetensors"))
    assert all(loaded[n].dtype == v.dtype and np.array_equal(loaded[n].view(np.uint8), v.view(np.uint8))
               for n, v in floats.items())
    with Checkpoint(tmp_path / "lib", {"quant_method": "fbgemm_fp8"}) as ckpt:
        assert sorted(ckpt.names) == ["bf16", "f16", "f32", "fp8.weight"]
        for name in ("f32", "f16", "bf16"):
            assert np.array_equal(ckpt.rows(name, 0, tensors[name].shape[0]), tensors[name])
        expected = tensors["fp8.weight"].astype(np.float32) * tensors["fp8.weight_scale"]
        assert np.array_equal(ckpt.rows("fp8.weight", 0, 3), expected)
