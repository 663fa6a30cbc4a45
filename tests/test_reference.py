"""Sanity of the numpy reference (tests/fixtures/reference_llama.py) itself, before it is used to judge converted
GGUFs."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.fixtures import reference_llama as ref
from tests.fixtures.checkpoint_factory import make_llama_checkpoint

LLAMA31_8B = {
    "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
# MODEL_FACTS: original_freq / scaled_freq for Llama 3.1
LLAMA31_FACTORS = [1.0] * 29 + [1.2075, 1.5534, 2.0263, 2.6945, 3.6843, 5.2573] + [8.0] * 29

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


def _tokens(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def _without_rope(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}


def test_llama3_frequency_factors_match_llama31() -> None:
    scaled, attention_factor = ref.rope_inv_freq(LLAMA31_8B)
    plain, _ = ref.rope_inv_freq({**LLAMA31_8B, "rope_scaling": None})
    assert attention_factor == 1.0
    np.testing.assert_allclose(plain / scaled, LLAMA31_FACTORS, atol=5e-5)


def test_llama3_factors_are_the_same_in_both_config_forms() -> None:
    v5 = _without_rope(LLAMA31_8B) | {"rope_parameters": {"rope_theta": 500000.0, **LLAMA31_8B["rope_scaling"]}}
    legacy_type_key = LLAMA31_8B | {"rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA31_8B["rope_scaling"]
                                                                       .items() if k != "rope_type"}}}
    expected, _ = ref.rope_inv_freq(LLAMA31_8B)
    np.testing.assert_array_equal(ref.rope_inv_freq(v5)[0], expected)
    np.testing.assert_array_equal(ref.rope_inv_freq(legacy_type_key)[0], expected)


def test_yarn_frequencies_and_attention_factor() -> None:
    config = {"hidden_size": 128, "num_attention_heads": 4, "max_position_embeddings": 2048, "rope_theta": 10000.0,
              "rope_scaling": YARN}
    inv_freq, attention_factor = ref.rope_inv_freq(config)
    plain, _ = ref.rope_inv_freq({**config, "rope_scaling": None})
    assert attention_factor == pytest.approx(0.1 * np.log(8.0) + 1.0)
    ratio = plain / inv_freq
    # dims that turn more than beta_fast = 32 times within 256 positions keep their frequency, those under one turn
    # (beta_slow) are interpolated by the full factor, with a linear ramp between
    turns = 256 * plain / (2 * np.pi)
    np.testing.assert_allclose(ratio[turns > 32 * 1.5], 1.0)
    np.testing.assert_allclose(ratio[turns < 1 / 1.5], 8.0)
    assert np.all(np.diff(ratio) >= 0)
    explicit, given = ref.rope_inv_freq({**config, "rope_scaling": {**YARN, "attention_factor": 1.25}})
    np.testing.assert_array_equal(explicit, inv_freq)
    assert given == 1.25
    assert ref.rope_inv_freq({**config, "rope_scaling": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}})[1] == 1.0


def test_yarn_refuses_a_factor_the_legacy_config_contradicts() -> None:
    config = {"hidden_size": 128, "num_attention_heads": 4, "max_position_embeddings": 1024, "rope_theta": 1e4,
              "rope_scaling": YARN}
    with pytest.raises(ValueError, match="ambiguous"):
        ref.rope_inv_freq(config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("tiny"), layers=2, seed=3)


def test_factory_writes_what_it_returns(tiny) -> None:
    config = json.loads((tiny.path / "config.json").read_text())
    assert config == tiny.config
    index = json.loads((tiny.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny.weights)
    for value in tiny.weights.values():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value.astype(ml_dtypes.bfloat16).astype(np.float32), value)


def test_causal(tiny) -> None:
    tokens = _tokens(tiny.config["vocab_size"], 64)
    changed = tokens.copy()
    changed[40:] = (changed[40:] + 7) % tiny.config["vocab_size"]
    a = ref.forward(tiny.weights, tiny.config, tokens)
    b = ref.forward(tiny.weights, tiny.config, changed)
    np.testing.assert_array_equal(a[:40], b[:40])
    assert np.abs(a[40:] - b[40:]).max() > 0.1 * np.abs(a).max()


def test_linear_factor_one_and_yarn_factor_one_equal_default(tiny) -> None:
    tokens = _tokens(tiny.config["vocab_size"], 300)
    plain = ref.forward(tiny.weights, tiny.config, tokens)
    linear = ref.forward(tiny.weights, tiny.config | {"rope_scaling": {"type": "linear", "factor": 1.0}}, tokens)
    yarn = ref.forward(tiny.weights, tiny.config | {"rope_scaling": {"rope_type": "yarn", "factor": 1.0}}, tokens)
    np.testing.assert_array_equal(linear, plain)
    np.testing.assert_allclose(yarn, plain, rtol=0, atol=1e-12 * np.abs(plain).max())


def test_linear_scaling_is_positions_divided_by_factor(tiny) -> None:
    inv_freq, _ = ref.rope_inv_freq(tiny.config | {"rope_scaling": {"type": "linear", "factor": 4.0}})
    np.testing.assert_allclose(inv_freq * 4.0, ref.rope_inv_freq(tiny.config)[0], rtol=1e-15)


def test_grouped_query_attention_equals_repeated_heads(tiny) -> None:
    """GQA with kv heads shared by consecutive query heads (HF's repeat_kv) equals MHA with the kv rows repeated."""
    group = tiny.config["num_attention_heads"] // tiny.config["num_key_value_heads"]
    d = ref.head_dim(tiny.config)
    mha = dict(tiny.weights)
    for name, value in tiny.weights.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            mha[name] = np.repeat(value.reshape(-1, d, value.shape[1]), group, axis=0).reshape(-1, value.shape[1])
    tokens = _tokens(tiny.config["vocab_size"], 50)
    gqa_logits = ref.forward(tiny.weights, tiny.config, tokens)
    mha_logits = ref.forward(mha, tiny.config | {"num_key_value_heads": tiny.config["num_attention_heads"]}, tokens)
    np.testing.assert_allclose(mha_logits, gqa_logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rope", [LLAMA3, YARN, {"type": "linear", "factor": 4.0}])
def test_both_config_forms_give_the_same_model(tmp_path: Path, rope: dict) -> None:
    legacy = make_llama_checkpoint(tmp_path / "legacy", rope=rope, config_form="legacy", seed=1)
    v5 = make_llama_checkpoint(tmp_path / "v5", rope=rope, config_form="v5", seed=1)
    assert "rope_parameters" in v5.config and "rope_scaling" not in v5.config and "rope_theta" not in v5.config
    assert "rope_parameters" not in legacy.config
    tokens = _tokens(legacy.config["vocab_size"], 400)
    np.testing.assert_array_equal(ref.forward(v5.weights, v5.config, tokens),
                                  ref.forward(legacy.weights, legacy.config, tokens))
    unscaled = ref.forward(legacy.weights, legacy.config | {"rope_scaling": None}, tokens)
    scaled = ref.forward(legacy.weights, legacy.config, tokens)
    assert np.abs(unscaled[300] - scaled[300]).max() > 0.05 * np.abs(scaled[300]).max()


def test_tied_embeddings(tmp_path: Path) -> None:
    ck = make_llama_checkpoint(tmp_path, tie_embeddings=True, layers=1, shards=1)
    assert "lm_head.weight" not in ck.weights and ck.config["tie_word_embeddings"] is True
    assert (tmp_path / "model.safetensors").is_file()
    logits = ref.forward(ck.weights, ck.config, [1, 2, 3])
    assert logits.shape == (3, ck.config["vocab_size"])
