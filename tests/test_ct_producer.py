"""Checkpoints written by compressed-tensors itself, the library llm-compressor saves NVFP4, MXFP4 and W4A16/W8A16
models with: we read them to the values the library's own decoding gives, and the GGUF holds its codes and scales.

The producer's files are committed in tests/data/compressed_tensors/ (written by compressed-tensors 0.20.0 with
torch 2.13.0+cpu; tests/fixtures/make_ct_producer_files.py regenerates them and says how): each preset's
`model.safetensors` is what the library's compressor wrote for layer 0's k_proj and down_proj, `decoded.safetensors`
the library's float32 decoding of them, `quantization_config.json` its config. No torch here: the test builds the rest
of the tiny model from the checkpoint factory, puts the producer's file in as a shard byte for byte, and converts."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import llama_cpp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from lcrun.convert.arch.base import rope_permutation
from lcrun.convert.convert import convert_checkpoint
from lcrun.convert.quant_config import load_quantization_config
from lcrun.convert.quants import Q
from lcrun.convert.safetensors_io import Checkpoint
from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.safetensors_writer import save_safetensors

DATA = Path(__file__).parent / "data" / "compressed_tensors"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text(encoding="utf-8"))
TYPES = {"nvfp4": Q.NVFP4, "mxfp4": Q.MXFP4, "int4": Q.Q4_0, "int4-asym": Q.Q4_1, "int8": Q.Q8_0}
K, DOWN = "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"
GGUF_NAMES = {K + ".weight": "blk.0.attn_k.weight", DOWN + ".weight": "blk.0.ffn_down.weight"}
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
# safetensors' own numpy API has no float8: the producer's files are also read here with numpy alone
DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "U8": np.uint8,
          "I32": np.int32, "I64": np.int64}


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def _tensors(path: Path) -> dict[str, np.ndarray]:
    header, start = _header(path)
    raw = path.read_bytes()
    return {name: np.frombuffer(raw[start + t["data_offsets"][0]:start + t["data_offsets"][1]],
                                DTYPES[t["dtype"]]).reshape(t["shape"])
            for name, t in header.items() if name != "__metadata__"}


def _flip_first_code(path: Path, tensor: str) -> None:
    """Change the first value's code of `tensor` (its lowest bit: the low nibble / low bits hold element 0)."""
    header, start = _header(path)
    raw = bytearray(path.read_bytes())
    raw[start + header[tensor]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(raw))


def _checkpoint(model_dir: Path, preset: str) -> Path:
    """The factory's tiny model with the producer's file as its first shard, copied byte for byte."""
    model = dict(MANIFEST["model"])
    seed = model.pop("seed")
    ck = make_llama_checkpoint(model_dir, shards=1, seed=seed, **model)
    (ck.path / "model.safetensors").unlink()
    producer = ck.path / "model-00001-of-00002.safetensors"
    shutil.copyfile(DATA / preset / "model.safetensors", producer)
    rest = {n: v.astype(ml_dtypes.bfloat16) for n, v in ck.weights.items()
            if n.removesuffix(".weight") not in MANIFEST["quantized"]}
    save_safetensors(ck.path / "model-00002-of-00002.safetensors", rest, {"format": "pt"})
    weight_map = {n: producer.name for n in _header(producer)[0] if n != "__metadata__"}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in rest})
    (ck.path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(ck.config, quantization_config=json.loads((DATA / preset / "quantization_config.json").read_text()))
    (ck.path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return ck.path


def _mismatches(path: Path, preset: str, library: dict[str, np.ndarray]) -> list[str]:
    """The weights whose values as we read them differ from the library's decoding."""
    config = json.loads((path / "config.json").read_text())
    bad = []
    with Checkpoint(path, load_quantization_config(path, config)) as ckpt:
        for name, values in library.items():
            ours = ckpt.rows(name, 0, values.shape[0])
            if preset == "nvfp4":   # the library divides each scale by the global scale first: 1-2 ulp apart
                same = np.allclose(ours, values, rtol=2 ** -22, atol=0)
            else:
                same = np.array_equal(ours, values)
            if not same:
                bad.append(name)
    return bad


def _manifest_problems(folder: Path) -> list[str]:
    listed = MANIFEST["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    problems = [f"{n}: not listed" for n in sorted(present - set(listed))]
    problems += [f"{n}: missing" for n in sorted(set(listed) - present)]
    problems += [f"{n}: sha256 differs" for n in sorted(present & set(listed))
                 if hashlib.sha256((folder / n).read_bytes()).hexdigest() != listed[n]]
    return problems


def test_golden_files_are_what_the_generator_wrote(tmp_path: Path) -> None:
    assert set(MANIFEST["presets"]) == set(TYPES)
    assert set(MANIFEST["files"]) == {f"{p}/{f}" for p in TYPES for f in
                                      ("model.safetensors", "decoded.safetensors", "quantization_config.json")}
    assert MANIFEST["versions"]["compressed-tensors"] == "0.20.0"   # the version the docs name
    assert _manifest_problems(DATA) == []
    # negative controls: an edited, a removed and an added file are each caught
    copy = tmp_path / "copy"
    shutil.copytree(DATA, copy)
    _flip_first_code(copy / "int4" / "decoded.safetensors", DOWN + ".weight")
    (copy / "mxfp4" / "quantization_config.json").unlink()
    (copy / "nvfp4" / "extra.safetensors").write_bytes(b"")
    assert _manifest_problems(copy) == ["nvfp4/extra.safetensors: not listed", "mxfp4/quantization_config.json: "
                                        "missing", "int4/decoded.safetensors: sha256 differs"]


@pytest.mark.parametrize("preset", list(TYPES))
def test_library_checkpoints_read_and_convert_exactly(tmp_path: Path, preset: str) -> None:
    path = _checkpoint(tmp_path / "hf", preset)
    library = load_file(str(DATA / preset / "decoded.safetensors"))
    assert sorted(library) == sorted(GGUF_NAMES) and all(v.dtype == np.float32 for v in library.values())
    assert _mismatches(path, preset, library) == []

    # negative control: one code changed in a copy of the producer's file is caught, in that tensor only
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    _flip_first_code(bad / "model-00001-of-00002.safetensors", DOWN + ".weight_packed")
    assert _mismatches(bad, preset, library) == [DOWN + ".weight"]

    result = convert_checkpoint(path, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(result.paths[0])
    tensors = {t.name: t for t in reader.tensors}
    quantized = set(GGUF_NAMES.values())
    assert {n: t.tensor_type for n, t in tensors.items() if n in quantized} == dict.fromkeys(quantized, TYPES[preset])
    others = {t.tensor_type for n, t in tensors.items() if n.startswith("blk.") and n.endswith(".weight")
              and n not in quantized and len(t.shape) == 2}
    assert others == {Q.BF16}                      # the recipe's `ignore`d layers, copied as stored
    assert all("carried as" in result.origins[n] for n in quantized)
    heads, head_dim = MANIFEST["model"]["kv_heads"], MANIFEST["model"]["hidden"] // MANIFEST["model"]["heads"]
    for hf_name, gguf_name in GGUF_NAMES.items():
        t = tensors[gguf_name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        scale = tensors.get(gguf_name.removesuffix(".weight") + ".scale")
        assert (scale is not None) == (preset == "nvfp4")
        values = values * float(scale.data[0]) if scale is not None else values
        ref = library[hf_name].astype(np.float64)
        ref = ref[rope_permutation(heads, head_dim)] if "attn_k" in gguf_name else ref
        if preset == "nvfp4":          # exact blocks; the per-tensor factor 1/global rounded once to F32
            assert np.allclose(values, ref, rtol=2 ** -22, atol=0), gguf_name
        elif preset == "int4-asym":    # m = −zero · scale rounded to F16 (the result's warning says so)
            assert np.abs(values - ref).max() <= 2 ** -11 * 15 * np.abs(ref).max() / 7, gguf_name
        else:                          # MXFP4, Q4_0, Q8_0: the library's values exactly
            assert np.array_equal(values, ref), gguf_name
    if preset == "nvfp4":
        # the block tensor is the library's E2M1 codes times its E4M3 scales exactly; the global scale goes to .scale
        stored = _tensors(DATA / preset / "model.safetensors")
        packed = stored[DOWN + ".weight_packed"]
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)   # element 2i low
        products = E2M1[codes] * np.repeat(stored[DOWN + ".weight_scale"].astype(np.float32), 16, axis=1)
        assert np.array_equal(gguf.quants.dequantize(tensors["blk.0.ffn_down.weight"].data, Q.NVFP4), products)
        g = stored[DOWN + ".weight_global_scale"][0]
        assert float(tensors["blk.0.ffn_down.scale"].data[0]) == np.float32(1) / np.float32(g)
    llm = llama_cpp.Llama(model_path=str(result.paths[0]), n_ctx=128, n_threads=1, verbose=False)
    try:
        assert llm.create_completion("Hello", max_tokens=4)["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()
