"""The converted model computes the numbers of the original, above all beyond the original training context.

Each case builds a tiny random Llama checkpoint (tests/fixtures/checkpoint_factory.py, original context 256), converts
it with `convert_checkpoint`, runs llama.cpp (llama-cpp-python, CPU) over 1,100 tokens and compares the next-token
logits with the float64 numpy reference (tests/reference_llama.py, written from transformers' semantics) at one
position in each of four windows: ~100 and ~250 (inside the original context), ~600 and ~1000 (beyond it). In each
window the position where the reference's top-1 is most clearly ahead is taken, and that lead must be ≥ 4 % of the
logit range, so "top-1 identical" is never decided by a near-tie. Error = max|llama.cpp − reference| / max|reference|.

llama-cpp-python's Llama() passes rope_freq_base/rope_freq_scale 0, rope_scaling_type UNSPECIFIED, yarn_ext_factor −1
and yarn_orig_ctx 0, all of which mean "from the file"; but it passes yarn_attn_factor 1, yarn_beta_fast 32 and
yarn_beta_slow 1 explicitly, where llama.cpp's own default (−1) means "from the file". We pass −1 for those three so
that only the GGUF's values are used.

Measured (llama-cpp-python 0.3.36, CPU; worst of the four checked positions, then worst over all 1,100 positions):
  outtype f32: 0.036 % (0.08 %)   f16: 0.092 % (0.26 %)   bf16: 0.40 % (1.2 %; llama.cpp rounds activations to bf16
  for bf16 matmuls)   q8_0: 1.8 % (3.5 %), top-1 identical at every checked position; bound 5 %.
  FP8, all six conventions: → f32 0.026 %, → f16 0.071 %.
  The f32 figures are those of a converter that writes F32 when asked for f32 (with bf16 tensors in an "f32" file the
  error is 0.2-0.46 %, which the f32 bound catches).
  Negative controls (rope_scaling removed): 20-50 % off the scaled reference at every checked position - llama3,
  linear and yarn rescale frequencies, not positions, so random weights move below 256 too - and ≤ 0.06 % off the
  unscaled reference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from lcrun.convert.convert import convert_checkpoint
from tests import reference_llama as ref
from tests.fixtures.checkpoint_factory import TinyCheckpoint, make_llama_checkpoint

ORIGINAL_CONTEXT = 256
N_TOKENS = 1100
N_CTX = 1280
WINDOWS = {"~100": range(90, 111), "~250": range(240, 256), "~600": range(590, 611), "~1000": range(990, 1011)}
BEYOND = ("~600", "~1000")
MIN_LEAD = 0.04
# The bar is 1 %. Each outtype is held to what its own precision allows (measured below, with 2-3x margin),
# so a file silently written at a lower precision than asked for fails too.
TOLERANCE = {"f32": 0.001, "f16": 0.003, "bf16": 0.01, "q8_0": 0.05}

ROPES: dict[str, tuple[dict | None, float]] = {
    # Gradient-style: a huge theta and no scaling dict
    "theta": (None, 3580165449.0),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL_CONTEXT}, 500000.0),
    "linear": ({"type": "linear", "factor": 4.0}, 10000.0),
    # factor = max_position_embeddings / original, so transformers 4.x and 5.x read the same model
    "yarn": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL_CONTEXT}, 10000.0),
}


@dataclass
class Comparison:
    positions: dict[str, int]
    errors: dict[str, float]
    same_top1: dict[str, bool]

    def worst(self, windows=WINDOWS) -> float:
        return max(self.errors[w] for w in windows)

    def passes(self, tolerance: float, windows=WINDOWS) -> bool:
        return all(self.same_top1[w] and self.errors[w] <= tolerance for w in windows)

    def __str__(self) -> str:
        return ", ".join(f"pos {self.positions[w]}: err {self.errors[w]:.4%} top1 {'=' if self.same_top1[w] else '≠'}"
                         for w in self.positions)


def _tokens(vocab: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(1234).integers(0, vocab, N_TOKENS)]


def _pick_positions(reference: np.ndarray) -> dict[str, int]:
    picked = {}
    for window, candidates in WINDOWS.items():
        top2 = np.sort(reference[list(candidates)], axis=1)[:, -2:]
        leads = (top2[:, 1] - top2[:, 0]) / np.abs(reference[list(candidates)]).max(axis=1)
        best = int(np.argmax(leads))
        assert leads[best] >= MIN_LEAD, f"test setup: no clear top-1 in window {window} (lead {leads[best]:.3f})"
        picked[window] = candidates[best]
    return picked


def _llama_cpp_logits(gguf_path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=N_CTX, n_batch=512, logits_all=True, n_gpu_layers=0,
                          verbose=False, seed=0, yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def _compare(logits: np.ndarray, reference: np.ndarray) -> Comparison:
    positions = _pick_positions(reference)
    errors = {w: float(np.abs(logits[p] - reference[p]).max() / np.abs(reference[p]).max())
              for w, p in positions.items()}
    same = {w: bool(logits[p].argmax() == reference[p].argmax()) for w, p in positions.items()}
    return Comparison(positions, errors, same)


def _convert_and_compare(ck: TinyCheckpoint, out_dir: Path, outtype: str, reference: np.ndarray | None = None,
                         tokens: list[int] | None = None) -> Comparison:
    tokens = tokens or _tokens(ck.config["vocab_size"])
    if reference is None:
        reference = ref.forward(ck.weights, ck.config, tokens)
    result = convert_checkpoint(ck.path, out_dir / f"model-{outtype}.gguf", outtype=outtype)
    assert len(result.paths) == 1
    return _compare(_llama_cpp_logits(result.paths[0], tokens), reference)


def _checkpoint(tmp_path: Path, kind: str, **kwargs) -> TinyCheckpoint:
    rope, theta = ROPES[kind]
    return make_llama_checkpoint(tmp_path / "hf", rope=rope, rope_theta=theta, max_position_embeddings=2048, **kwargs)


slow = pytest.mark.slow
CASES = [
    # (rope kind, config form, source dtype, outtype)
    pytest.param("theta", "legacy", "bf16", "f16", id="theta-legacy-bf16-f16"),
    pytest.param("llama3", "legacy", "bf16", "f16", id="llama3-legacy-bf16-f16"),
    pytest.param("llama3", "v5", "bf16", "bf16", id="llama3-v5-bf16-bf16"),
    pytest.param("linear", "legacy", "f16", "f32", id="linear-legacy-f16-f32"),
    pytest.param("yarn", "v5", "bf16", "f16", id="yarn-v5-bf16-f16"),
    pytest.param("yarn", "legacy", "f32", "f16", id="yarn-legacy-f32-f16"),
    pytest.param("theta", "v5", "f32", "f32", id="theta-v5-f32-f32", marks=slow),
    pytest.param("llama3", "legacy", "bf16", "f32", id="llama3-legacy-bf16-f32", marks=slow),
    pytest.param("llama3", "v5", "f16", "f16", id="llama3-v5-f16-f16", marks=slow),
    pytest.param("linear", "v5", "bf16", "bf16", id="linear-v5-bf16-bf16", marks=slow),
    pytest.param("yarn", "legacy", "bf16", "bf16", id="yarn-legacy-bf16-bf16", marks=slow),
    pytest.param("theta", "legacy", "bf16", "bf16", id="theta-legacy-bf16-bf16", marks=slow),
]


@pytest.mark.parametrize(("kind", "config_form", "dtype", "outtype"), CASES)
def test_logits_match_reference(tmp_path: Path, kind: str, config_form: str, dtype: str, outtype: str) -> None:
    ck = _checkpoint(tmp_path, kind, config_form=config_form, dtype=dtype, seed=0)
    result = _convert_and_compare(ck, tmp_path, outtype)
    assert result.passes(TOLERANCE[outtype]), f"{kind} {config_form} {dtype}→{outtype}: {result}"


def test_tied_embeddings_match_reference(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path, "llama3", config_form="v5", tie_embeddings=True, seed=2)
    result = _convert_and_compare(ck, tmp_path, "f16")
    assert result.passes(TOLERANCE["f16"]), str(result)


def test_q8_0_stays_close(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path, "llama3", config_form="legacy", dtype="bf16", seed=0)
    result = _convert_and_compare(ck, tmp_path, "q8_0")
    assert result.passes(TOLERANCE["q8_0"]), str(result)


@pytest.mark.parametrize("kind", ["llama3", pytest.param("linear", marks=slow), pytest.param("yarn", marks=slow)])
def test_dropping_the_rope_scaling_is_caught(tmp_path: Path, kind: str) -> None:
    """Negative control: a checkpoint whose config lost its rope_scaling converts to a faithful *unscaled* model,
    and the comparison against the scaled original fails beyond the original context."""
    ck = _checkpoint(tmp_path, kind, config_form="legacy", dtype="bf16", seed=0)
    config = json.loads((ck.path / "config.json").read_text())
    config["rope_scaling"] = None
    (ck.path / "config.json").write_text(json.dumps(config, indent=2))
    tokens = _tokens(ck.config["vocab_size"])
    gguf_path = convert_checkpoint(ck.path, tmp_path / "unscaled.gguf", outtype="f16").paths[0]
    logits = _llama_cpp_logits(gguf_path, tokens)

    against_scaled = _compare(logits, ref.forward(ck.weights, ck.config, tokens))
    assert not against_scaled.passes(TOLERANCE["bf16"], BEYOND), str(against_scaled)
    assert against_scaled.worst(BEYOND) > 10 * TOLERANCE["bf16"], str(against_scaled)
    # the harness sees exactly the missing scaling: against the unscaled reference the same file is faithful
    against_unscaled = _compare(logits, ref.forward(ck.weights, config, tokens))
    assert against_unscaled.passes(TOLERANCE["f16"]), str(against_unscaled)


@pytest.mark.parametrize(("fp8", "outtype"), [
    ("fbgemm", "f32"), ("autofp8", "f16"), ("ct-tensor", "f32"), ("ct-channel", "f16"), ("ct-block", "f32"),
    ("block-inv", "f16"),
])
def test_fp8_checkpoints_match_reference(tmp_path: Path, fp8: str, outtype: str) -> None:
    # ffn 320 leaves the block formats a partial 128-column block in down_proj
    ck = _checkpoint(tmp_path, "llama3", config_form="legacy", dtype="bf16", fp8=fp8, ffn=320, seed=4)
    result = _convert_and_compare(ck, tmp_path, outtype)
    assert result.passes(TOLERANCE[outtype]), f"{fp8}→{outtype}: {result}"


def _as_architecture(ck: TinyCheckpoint, architecture: str, model_type: str, biases: bool) -> None:
    """Re-label a tiny Llama checkpoint (f32) as another registered architecture, optionally with Q/K/V biases."""
    from tests.fixtures.safetensors_writer import save_safetensors

    rng = np.random.default_rng(9)
    if biases:
        for i in range(ck.config["num_hidden_layers"]):
            for proj in ("q", "k", "v"):
                rows = ck.weights[f"model.layers.{i}.self_attn.{proj}_proj.weight"].shape[0]
                ck.weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = rng.normal(0, 0.5, rows).astype(np.float32)
    for shard in ck.path.glob("*.safetensors"):
        shard.unlink()
    (ck.path / "model.safetensors.index.json").unlink(missing_ok=True)
    save_safetensors(ck.path / "model.safetensors", ck.weights)
    ck.config.update(architectures=[architecture], model_type=model_type)
    (ck.path / "config.json").write_text(json.dumps(ck.config, indent=2))


@pytest.mark.parametrize(("architecture", "model_type", "biases"), [
    ("MistralForCausalLM", "mistral", False),   # llama.cpp's llama graph, Q/K permuted
    ("Qwen2ForCausalLM", "qwen2", True),        # NEOX RoPE (no permutation) and Q/K/V biases
])
def test_other_registered_architectures_match_reference(tmp_path: Path, architecture: str, model_type: str,
                                                         biases: bool) -> None:
    ck = _checkpoint(tmp_path, "theta", config_form="legacy", dtype="f32", seed=3)
    _as_architecture(ck, architecture, model_type, biases)
    result = _convert_and_compare(ck, tmp_path, "f32")
    assert result.passes(TOLERANCE["f32"]), f"{architecture}: {result}"
