"""4-bit and packed-integer checkpoints (ModelOpt NVFP4/FP8, compressed-tensors NVFP4/MXFP4/int, GPTQ, AWQ) through
`lcrun convert`: each weight lands in the GGUF type that holds it, its values intact, llama.cpp runs the file, and bad
input is one line with nothing written.

Fidelity (tests/fixtures/fidelity.py: 1,100 tokens, two positions inside the original context of 256 and two beyond)
measured with llama-cpp-python 0.3.36 on the CPU, worst of four positions; `ref` is the float64 reference forward
pass on the checkpoint's own dequantized weights, `f32` llama.cpp on an F32 GGUF of those same weights:
  ModelOpt NVFP4 -> NVFP4: 0.99 % vs ref, 1.01 % vs f32 · compressed-tensors MXFP4 -> MXFP4: 1.13 % / 1.13 %
  GPTQ sym -> Q4_0: 1.21 % / 1.22 % · AWQ -> Q4_1: 0.98 % / 0.99 %; the F32 twin itself is 0.02-0.05 % off ref.
  All of it is llama.cpp rounding activations to Q8_0 for 4-bit weights on the CPU; top-1 identical everywhere.
  Negative controls on the NVFP4 file: nibbles left in checkpoint order 66-86 %, top-1 wrong; the per-tensor scale
  lost: NaN; Q/K rows unpermuted: 29-45 %.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import llama_cpp
import ml_dtypes
import numpy as np
import pytest

from lcrun.convert import convert as convert_module
from lcrun.convert import fp4
from lcrun.convert.arch.base import rope_permutation
from lcrun.convert.convert import convert_checkpoint
from lcrun.convert.int_packed import AWQ_ORDER, awq_rows, gptq_rows
from lcrun.convert.quants import Q
from tests.fixtures import ggml_ref
from tests.fixtures.cli import assert_one_line_error, invoke
from tests.fixtures.fidelity import ROPES, compare, llama_cpp_logits, probe_tokens, reference_logits
from tests.fixtures.hub_server import FakeHub
from tests.fixtures.quant_factory import dequantized_twin, make_quantized_checkpoint
from tests.fixtures.safetensors_writer import save_safetensors

SMALL = {"hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 2, "layers": 2}
CARRIED = {
    "modelopt-nvfp4": Q.NVFP4, "ct-nvfp4": Q.NVFP4, "ct-mxfp4": Q.MXFP4, "ct-int4": Q.Q4_0, "ct-int4-asym": Q.Q4_1,
    "ct-int8": Q.Q8_0, "gptq": Q.Q4_0, "gptq-asym": Q.Q4_1, "gptq-desc-act": Q.F16, "awq": Q.Q4_1,
}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def _reference(ck, gguf_name: str) -> np.ndarray:
    _, layer, kind, _ = gguf_name.split(".")
    ref = ck.weights[f"model.layers.{layer}.{HF_NAMES[kind]}.weight"].astype(np.float64)
    if kind in ("attn_q", "attn_k"):
        heads = ck.config["num_attention_heads"] if kind == "attn_q" else ck.config["num_key_value_heads"]
        ref = ref[rope_permutation(heads, ref.shape[0] // heads)]
    return ref


def _decoded(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, t in tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2:
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            scale = tensors.get(name.removesuffix(".weight") + ".scale")
            out[name] = values * float(scale.data[0]) if scale is not None else values
    return out


@pytest.mark.parametrize("fmt", list(CARRIED))
def test_each_weight_keeps_its_values_in_the_type_that_holds_them(tmp_path: Path, fmt: str) -> None:
    ck = make_quantized_checkpoint(tmp_path / "hf", fmt, **SMALL)
    result = convert_checkpoint(ck.path, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(result.paths[0])
    types = {t.name: t.tensor_type for t in reader.tensors}
    expected = CARRIED[fmt]
    assert {t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight")} - {Q.F32} == {expected}
    assert types["token_embd.weight"] == types["output.weight"] == Q.BF16       # stored BF16, copied
    assert sum(n.endswith(".scale") for n in types) == (14 if expected == Q.NVFP4 else 0)
    for name, values in _decoded(reader).items():
        ref = _reference(ck, name)
        if expected == Q.NVFP4:    # exact blocks; the per-tensor factor rounded once to F32
            assert np.allclose(values, ref, rtol=2 ** -22, atol=0), name
        elif expected == Q.Q4_1:   # m = −zero · scale rounded to F16 (the file's warning says so)
            assert np.abs(values - ref).max() <= 2 ** -11 * 15 * np.abs(ref).max() / 7, name
        elif expected == Q.F16:    # GPTQ with activation order: no block type holds it; rounded to F16
            assert np.allclose(values, ref, rtol=2 ** -11, atol=0), name
        else:                      # MXFP4, Q4_0, Q8_0: exactly the checkpoint's values
            assert np.array_equal(values, ref), name
    origins = set(result.origins.values())
    assert len(origins) == 1 and ("carried as" in origins.pop()) == (expected != Q.F16)
    if expected in (Q.Q4_1, Q.F16):
        assert result.warnings and ("rounded to F16" in result.warnings[0] or "decoded" in result.warnings[0])


def test_modelopt_mixed_precision_keeps_each_layer_as_it_is(tmp_path: Path) -> None:
    """NVFP4 layers stay NVFP4, FP8 layers are decoded (GGUF has no FP8), unquantized o_proj is copied."""
    ck = make_quantized_checkpoint(tmp_path / "hf", "modelopt-mixed", **SMALL)
    result = convert_checkpoint(ck.path, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(result.paths[0])
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == Q.NVFP4 and "blk.0.ffn_up.scale" in types
    assert types["blk.1.ffn_up.weight"] == Q.BF16 and "blk.1.ffn_up.scale" not in types
    assert types["blk.0.attn_output.weight"] == types["blk.1.attn_output.weight"] == Q.BF16
    decoded = _decoded(reader)
    assert np.allclose(decoded["blk.0.ffn_up.weight"], _reference(ck, "blk.0.ffn_up.weight"), rtol=2 ** -22, atol=0)
    fp8 = _reference(ck, "blk.1.ffn_up.weight")
    assert np.array_equal(decoded["blk.1.ffn_up.weight"], fp8.astype(ml_dtypes.bfloat16).astype(np.float64))
    assert result.origins["blk.1.ffn_up.weight"] == "ModelOpt MIXED_PRECISION F8_E4M3, decoded to BF16"


# ---- llama.cpp runs them, as faithfully as the same weights in F32 ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["modelopt-nvfp4", "ct-mxfp4", "gptq", "awq"])
def test_llama_cpp_runs_the_file_as_faithfully_as_an_f32_copy(tmp_path: Path, fmt: str) -> None:
    rope, theta = ROPES["llama3"]
    ck = make_quantized_checkpoint(tmp_path / "hf", fmt, rope=rope, rope_theta=theta, max_position_embeddings=2048,
                                   seed=4)
    tokens = probe_tokens(ck.config["vocab_size"])
    ref = reference_logits(ck, tokens)
    logits = llama_cpp_logits(convert_checkpoint(ck.path, tmp_path / "q.gguf").paths[0], tokens)
    f32 = llama_cpp_logits(convert_checkpoint(dequantized_twin(ck, tmp_path / "twin"), tmp_path / "f.gguf",
                                              outtype="f32").paths[0], tokens)
    assert compare(f32, ref).passes(0.001)
    # llama.cpp rounds activations to Q8_0 for 4-bit weights on the CPU: ~1 %, measured above
    assert compare(logits, ref).passes(0.02), str(compare(logits, ref))
    assert compare(logits, f32).passes(0.02), str(compare(logits, f32))


@pytest.mark.slow
def test_broken_repacks_are_caught_by_the_same_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative controls: checkpoint nibble order copied as it is, or the per-tensor factor lost."""
    rope, theta = ROPES["llama3"]
    ck = make_quantized_checkpoint(tmp_path / "hf", "ct-nvfp4", rope=rope, rope_theta=theta,
                                   max_position_embeddings=2048, seed=4)
    tokens = probe_tokens(ck.config["vocab_size"])
    ref = reference_logits(ck, tokens)

    def unordered(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        rows = len(codes)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return np.concatenate([scales.reshape(rows, -1, 4), packed.reshape(rows, -1, 32)], -1).reshape(rows, -1)

    with monkeypatch.context() as m:
        m.setattr(fp4, "nvfp4_blocks", unordered)
        swapped = compare(llama_cpp_logits(convert_checkpoint(ck.path, tmp_path / "a.gguf").paths[0], tokens), ref)
    assert swapped.worst() > 0.5 and not any(swapped.same_top1.values()), str(swapped)

    def lose(ckpt, gplan, prescales) -> None:
        for plan in gplan.plans:
            if plan.name in gplan.factors:
                plan.data[0] = 1.0

    with monkeypatch.context() as m:
        m.setattr(convert_module, "_fill_factors", lose)
        lost = compare(llama_cpp_logits(convert_checkpoint(ck.path, tmp_path / "b.gguf").paths[0], tokens), ref)
    assert not lost.worst() <= 0.5, str(lost)   # NaN or far off


# ---- --outtype nvfp4 / mxfp4 from floats -----------------------------------------------------------------------------

@pytest.mark.parametrize("outtype", ["nvfp4", "mxfp4"])
def test_outtype_fp4_equals_ggml_reference_quantizer(tmp_path: Path, outtype: str) -> None:
    ck = make_quantized_checkpoint(tmp_path / "hf", "ct-int8", **SMALL)   # any checkpoint: decoded, re-encoded
    result = convert_checkpoint(ck.path, tmp_path / "m.gguf", outtype=outtype)
    reader = gguf.GGUFReader(result.paths[0])
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["token_embd.weight"].tensor_type == tensors["output.weight"].tensor_type == Q.Q8_0
    for name in ("blk.0.attn_k.weight", "blk.1.ffn_down.weight"):
        rows = _reference(ck, name).astype(np.float32)
        factor = np.float32(1)
        if outtype == "nvfp4":
            prescale = fp4.power_of_two_prescale(float(np.abs(rows).max()))
            factor = np.float32(1 / prescale)
            assert float(tensors[name.replace(".weight", ".scale")].data[0]) == factor
            rows = rows * np.float32(prescale)
        assert tensors[name].data.tobytes() == ggml_ref.quantize(outtype, rows), name
    llm = llama_cpp.Llama(model_path=str(result.paths[0]), n_ctx=128, verbose=False)
    try:
        assert len(llm.create_completion("Hello", max_tokens=4)["choices"][0]["text"]) >= 0
    finally:
        llm.close()


# ---- the packing formulas of the libraries that write GPTQ and AWQ, on hand-made words -------------------------------

def test_awq_and_gptq_word_layouts() -> None:
    """AutoAWQ packs columns 0..7 of a word in the order 0 2 4 6 1 3 5 7 from the low bits (WQLinear_GEMM); GPTQ
    packs input rows from the low bits and stores zero − 1. Words written by hand, not by our packer."""
    word = np.array([[0x76543210]], dtype=np.uint32).view(np.int32)          # nibble k holds the value k
    rows = awq_rows(np.repeat(word, 2, axis=0), np.zeros((1, 1), np.int32), np.ones((1, 8), np.float16),
                    np.arange(8), group=2, bits=4)
    assert rows.codes[:, 0].tolist() == AWQ_ORDER.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    qzeros = np.array([[0x77777777]], dtype=np.uint32).view(np.int32)
    g = gptq_rows(word.reshape(1, 1).repeat(8, axis=1), qzeros, np.full((1, 8), 0.5, np.float16),
                  np.zeros(8, np.int64), np.arange(8), bits=4, v2=False)
    assert g.codes[0].tolist() == list(range(8)) and g.zeros[0, 0] == 8
    assert g.decode()[0].tolist() == [(k - 8) * 0.5 for k in range(8)]


# ---- bad input: one line, nothing written ----------------------------------------------------------------------------

def _rewrite(ck, change) -> None:
    tensors = dict(ck.stored)
    change(tensors)
    save_safetensors(ck.path / "model.safetensors", tensors)


BAD = {
    "scale-shape": ("ct-nvfp4", lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale":
                                                   t["model.layers.0.mlp.up_proj.weight_scale"][:, :4]}),
                    "model.layers.0.mlp.up_proj.weight_scale has shape [256, 4]"),
    "scale-dtype": ("modelopt-nvfp4", lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale":
                                                         t["model.layers.0.mlp.up_proj.weight_scale"].astype(np.float32)}),
                    "has dtype F32; expected F8_E4M3"),
    "no-global": ("ct-nvfp4", lambda t: t.pop("model.layers.1.self_attn.v_proj.weight_global_scale"),
                  "has no weight_global_scale"),
    "g_idx": ("gptq", lambda t: t["model.layers.0.mlp.down_proj.g_idx"].__setitem__(3, 9),
              "g_idx[3] = 9 is outside the 4 groups"),
    "weight_shape": ("ct-int4", lambda t: t.update({"model.layers.0.mlp.gate_proj.weight_shape":
                                                   np.array([256, 120], np.int64)}),
                     "but weight_shape says [256, 120]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    fmt, change, fragment = BAD[case]
    ck = make_quantized_checkpoint(tmp_path / "hf", fmt, **SMALL)
    _rewrite(ck, change)
    out = tmp_path / "out"
    out.mkdir()
    run = invoke("convert", str(ck.path), "-o", str(out / "m.gguf"))
    assert_one_line_error(run, fragment)
    assert list(out.iterdir()) == []


# ---- estimate before download, inspect after ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["ct-nvfp4", "gptq"])
def test_estimate_of_a_hub_repo_is_the_converted_file(fake_hub: FakeHub, tmp_path: Path, fmt: str) -> None:
    # big enough that huggingface_hub's first ranged read of a shard (up to 100 KB) is far from the whole file
    ck = make_quantized_checkpoint(tmp_path / "hf", fmt, **{**SMALL, "hidden": 256, "ffn": 1024})
    files = {p.name: p.read_bytes() for p in ck.path.iterdir()}
    fake_hub.add_repo("org/Tiny-4bit", files)
    run = invoke("estimate", "org/Tiny-4bit", "--ctx", "1024", "--ram", "8G", "--json")
    assert run.exit_code == 0, run.stderr
    [plan] = json.loads(run.stdout)["plans"]
    written = convert_checkpoint(ck.path, tmp_path / "m.gguf").paths[0]
    sizes = sum(t.n_bytes for t in gguf.GGUFReader(written).tensors)
    assert plan["quant"] == CARRIED[fmt].name and plan["weights_bytes"] == sizes
    weights = sum(len(b) for n, b in files.items() if n.endswith(".safetensors"))
    assert fake_hub.bytes_served() < 150_000 and weights > 4 * fake_hub.bytes_served()


def test_inspect_says_where_each_tensor_came_from(tmp_path: Path) -> None:
    ck = make_quantized_checkpoint(tmp_path / "hf", "awq", **SMALL)
    path = convert_checkpoint(ck.path, tmp_path / "m.gguf").paths[0]
    report = json.loads(invoke("inspect", str(path), "--json").stdout)
    assert report["tensor_origins"]["blk.1.attn_q.weight"] == "AWQ int4 g64 asym, carried as Q4_1"
    assert report["lcrun"]["lcrun.source.quantization"] == "AWQ int4 g64"
    text = invoke("inspect", str(path)).stdout
    assert "AWQ int4 g64 asym, carried as Q4_1" in text and "14" in text


def test_a_llama_cpp_quant_type_starts_from_the_decoded_weights(tmp_path: Path) -> None:
    """llama.cpp's quantizer refuses to re-quantize Q4_0/NVFP4 input: the intermediate file is F16."""
    ck = make_quantized_checkpoint(tmp_path / "hf", "gptq", **SMALL)
    run = invoke("convert", str(ck.path), "-o", str(tmp_path / "m.gguf"), "--outtype", "Q5_0", "--quiet")
    assert run.exit_code == 0, run.stderr
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == Q.Q5_0


def test_modelopt_w4a16_keeps_activations_off_4_bits(tmp_path: Path) -> None:
    """W4A16_NVFP4 was calibrated for 16-bit activations: llama.cpp's per-tensor precision policy is told so."""
    ck = make_quantized_checkpoint(tmp_path / "hf", "modelopt-nvfp4", **SMALL)
    hf = ck.path / "hf_quant_config.json"
    hf.write_text(hf.read_text().replace('"NVFP4"', '"W4A16_NVFP4"'))
    reader = gguf.GGUFReader(convert_checkpoint(ck.path, tmp_path / "m.gguf").paths[0])
    names = reader.fields["general.tensor_extra.name"]
    flags = reader.fields["general.tensor_extra.prec_a4"]
    assert len(names.data) == len(flags.data) == 14 and not any(flags.parts[i][0] for i in flags.data)
    assert "blk.0.attn_q.weight" in {bytes(names.parts[i]).decode() for i in names.data}
