"""`llama_tensor_types` against the real quantizer: small llama / qwen2 GGUFs are quantized with llama.cpp's own
`llama_model_quantize` and every tensor's written type and size must be the predicted ones."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from lcrun.engine import quantize_gguf
from lcrun.errors import EngineError
from lcrun.quant_mix import llama_tensor_types, quantized_nbytes
from tests.fixtures.gguf_llama import add_llama_hparams

T = gguf.GGMLQuantizationType
VOCAB = 64


@dataclass(frozen=True)
class Spec:
    arch: str
    hidden: int
    ffn: int
    n_layer: int
    n_head: int
    n_head_kv: int
    tied: bool = False            # no output.weight: token_embd takes the output tensor's rule
    f16_source: bool = False      # 2-D weights stored as F16, as convert_hf_to_gguf writes them

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    def shapes(self) -> dict[str, tuple[int, ...]]:
        kv = self.head_dim * self.n_head_kv
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, self.hidden),
                                              "output_norm.weight": (self.hidden,)}
        if not self.tied:
            shapes["output.weight"] = (VOCAB, self.hidden)
        for i in range(self.n_layer):
            b = f"blk.{i}."
            shapes |= {b + "attn_norm.weight": (self.hidden,), b + "attn_q.weight": (self.hidden, self.hidden),
                       b + "attn_k.weight": (kv, self.hidden), b + "attn_v.weight": (kv, self.hidden),
                       b + "attn_output.weight": (self.hidden, self.hidden), b + "ffn_norm.weight": (self.hidden,),
                       b + "ffn_gate.weight": (self.ffn, self.hidden), b + "ffn_up.weight": (self.ffn, self.hidden),
                       b + "ffn_down.weight": (self.hidden, self.ffn)}
            if self.arch == "qwen2":
                shapes |= {b + "attn_q.bias": (self.hidden,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
        return shapes


MODELS = {
    "llama-gqa": Spec("llama", 256, 256, 8, 8, 2, f16_source=True),
    "llama-mha-tied": Spec("llama", 256, 256, 8, 4, 4, tied=True),
    "llama-ffn320": Spec("llama", 256, 320, 8, 8, 2),       # ffn_down rows of 320: K-quants fall back
    "qwen2-hidden288": Spec("qwen2", 288, 256, 8, 4, 1),    # every row of 288: fallbacks, output → Q8_0
    "llama-hidden80": Spec("llama", 80, 256, 8, 2, 2),      # rows of 80 fit no 32-block: F16
}
FTYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_L", "Q3_K_S", "Q2_K", "Q4_0",
          "Q4_1", "Q5_0", "Q5_1", "IQ4_XS", "IQ4_NL", "F16", "BF16"]
# IQ3 quantization is slow (a grid search per block): checked on the two models whose rules differ for it
SLOW_FTYPES = ["IQ3_S", "IQ3_M"]
CASES = [(model, ftype) for model in MODELS for ftype in FTYPES] + \
        [(model, ftype) for model in ("llama-gqa", "llama-mha-tied") for ftype in SLOW_FTYPES]
NEEDS_IMATRIX = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"]


def _write_model(path: Path, spec: Spec) -> None:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, spec.arch)
    add_llama_hparams(writer, n_ctx=128, n_embd=spec.hidden, n_layer=spec.n_layer, n_ff=spec.ffn, n_head=spec.n_head,
                      n_head_kv=spec.n_head_kv, head_dim=spec.head_dim, n_vocab=VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if spec.f16_source else gguf.LlamaFileType.ALL_F32)
    for name, shape in spec.shapes().items():
        data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        writer.add_tensor(name, data.astype(np.float16) if spec.f16_source and len(shape) == 2 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quant_mix")
    paths = {}
    for key, spec in MODELS.items():
        paths[key] = folder / f"{key}.gguf"
        _write_model(paths[key], spec)
    return paths


def _predict(spec: Spec, ftype: str) -> dict[str, T]:
    return llama_tensor_types(spec.arch, list(spec.shapes().items()), ftype, n_layer=spec.n_layer,
                              n_head=spec.n_head, n_head_kv=spec.n_head_kv)


def _quantize(src: Path, dst: Path, ftype: str) -> dict[str, gguf.ReaderTensor]:
    quantize_gguf(src, dst, ftype)
    return {t.name: t for t in gguf.GGUFReader(dst).tensors}


@pytest.mark.parametrize(("model", "ftype"), CASES)
def test_every_tensor_type_and_size_match_llama_cpp(sources, tmp_path: Path, model: str, ftype: str) -> None:
    spec = MODELS[model]
    written = _quantize(sources[model], tmp_path / "q.gguf", ftype)
    predicted = _predict(spec, ftype)

    assert set(written) == set(predicted)
    actual = {name: T(t.tensor_type) for name, t in written.items()}
    assert {n: q.name for n, q in predicted.items()} == {n: q.name for n, q in actual.items()}
    for name, shape in spec.shapes().items():
        assert int(written[name].n_bytes) == quantized_nbytes(shape, predicted[name]), name


def test_llama_70b_gives_attn_v_more_bits(tmp_path: Path) -> None:
    spec = Spec("llama", 256, 256, 80, 8, 2, f16_source=True)   # llama.cpp's LLM_TYPE_70B: 80 layers with GQA
    _write_model(tmp_path / "70b.gguf", spec)
    written = _quantize(tmp_path / "70b.gguf", tmp_path / "q.gguf", "Q3_K_M")
    predicted = _predict(spec, "Q3_K_M")
    assert predicted["blk.40.attn_v.weight"] == T.Q5_K            # Q4_K for any other size
    assert {n: q.name for n, q in predicted.items()} == {n: T(t.tensor_type).name for n, t in written.items()}


def test_q4_k_m_layer_pattern_is_the_documented_one() -> None:
    types = _predict(MODELS["llama-gqa"], "Q4_K_M")
    # use_more_bits over 8 layers: the first eighth, the last eighth, and every third layer in between
    more_bits = [i for i in range(8) if types[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
    assert more_bits == [0, 3, 6, 7]
    assert [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K] == more_bits
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.1.attn_q.weight"] == T.Q4_K and types["blk.1.attn_norm.weight"] == T.F32


def test_a_naive_rule_is_caught(sources, tmp_path: Path) -> None:
    spec = MODELS["llama-gqa"]
    written = _quantize(sources["llama-gqa"], tmp_path / "q.gguf", "Q4_K_M")
    naive = {name: (T.Q4_K if len(shape) == 2 else T.F32) for name, shape in spec.shapes().items()}
    assert naive != {name: T(t.tensor_type) for name, t in written.items()}
    # ignoring GQA (n_head_kv taken as n_head) mispredicts attn_v at IQ4_XS
    no_gqa = llama_tensor_types("llama", list(spec.shapes().items()), "IQ4_XS", n_layer=8, n_head=8, n_head_kv=8)
    assert no_gqa["blk.0.attn_v.weight"] != _predict(spec, "IQ4_XS")["blk.0.attn_v.weight"]


@pytest.mark.parametrize("ftype", NEEDS_IMATRIX)
def test_ftypes_needing_an_imatrix_are_refused_like_llama_cpp(sources, tmp_path: Path, ftype: str) -> None:
    with pytest.raises(ValueError, match="importance matrix"):
        _predict(MODELS["llama-gqa"], ftype)
    with pytest.raises(EngineError):
        quantize_gguf(sources["llama-gqa"], tmp_path / "q.gguf", ftype)


def test_unknown_ftype_and_arch_are_refused() -> None:
    with pytest.raises(ValueError, match="Q9_K"):
        llama_tensor_types("llama", [], "Q9_K", n_layer=1, n_head=1, n_head_kv=1)
    with pytest.raises(ValueError, match="falcon"):
        llama_tensor_types("falcon", [], "Q4_K_M", n_layer=1, n_head=1, n_head_kv=1)


def test_quantized_nbytes() -> None:
    assert quantized_nbytes((4096, 4096), T.Q4_K) == 4096 * 16 * 144
    assert quantized_nbytes((10, 64), T.Q8_0) == 10 * 2 * 34
    assert quantized_nbytes((7,), T.F32) == 28
    with pytest.raises(ValueError):
        quantized_nbytes((4, 320), T.Q4_K)
