"""An independent float64 numpy Llama forward pass on Hugging Face-layout weights, the yardstick for converted GGUFs.

Written from transformers' semantics (modeling_llama.py, modeling_rope_utils.py), not from lcrun's converter: q/k use
HF's rotate-half RoPE on the un-permuted projections, and the RoPE inverse frequencies are computed the way
transformers computes them for rope_type default, linear, llama3 and yarn. The config may carry RoPE in either form:
legacy `rope_theta` + `rope_scaling` ("type" or "rope_type"), or transformers ≥ 5 `rope_parameters`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE fields of `config` in transformers ≥ 5 form: rope_theta, rope_type and the scaling fields."""
    if config.get("rope_parameters") is not None:
        params = dict(config["rope_parameters"])
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    else:
        params = dict(config.get("rope_scaling") or {})
        params["rope_theta"] = config.get("rope_theta", 10000.0)
        if params.get("rope_type", params.get("type")) == "yarn" and "original_max_position_embeddings" in params:
            # transformers 4.x derived yarn's factor from max_position_embeddings / original; 5.x takes "factor".
            # A config where the two disagree means different models to different versions: refuse it.
            implied = config["max_position_embeddings"] / params["original_max_position_embeddings"]
            if "factor" in params and not math.isclose(implied, params["factor"]):
                raise ValueError(f"yarn factor {params['factor']} != max_position_embeddings / "
                                 f"original_max_position_embeddings = {implied}: ambiguous across transformers "
                                 "versions")
    kind = params.get("rope_type", params.get("type")) or "default"
    params["rope_type"] = kind
    params.pop("type", None)
    return params


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def _llama3_inv_freq(inv_freq: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    factor = p["factor"]
    low_freq_factor = p["low_freq_factor"]
    high_freq_factor = p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, p: dict[str, Any], config: dict[str, Any]) -> tuple[np.ndarray, float]:
    original = p.get("original_max_position_embeddings") or config["max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:
        factor = config["max_position_embeddings"] / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1
    truncate = p.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)

    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def rope_inv_freq(config: dict[str, Any]) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2], attention factor applied to cos and sin), as transformers computes them."""
    p = rope_parameters(config)
    base = float(p["rope_theta"])
    dim = int(head_dim(config) * p.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    kind = p["rope_type"]
    if kind == "default":
        return _default_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _default_inv_freq(base, dim) / p["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_default_inv_freq(base, dim), p), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(base, dim, p, config)
    raise NotImplementedError(f"rope_type {kind!r}")


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(weights: dict[str, np.ndarray], config: dict[str, Any], token_ids) -> np.ndarray:
    """Logits [n_tokens, vocab] (float64) for `token_ids` at positions 0..n-1, causal."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids)
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = head_dim(config)
    eps = config.get("rms_norm_eps", 1e-6)

    inv_freq, attention_factor = rope_inv_freq(config)
    angles = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([angles, angles], axis=-1)  # [n, d]: HF repeats the half; rotate-half pairs i with i + d/2
    cos, sin = np.cos(emb) * attention_factor, np.sin(emb) * attention_factor
    causal = np.triu(np.full((n, n), -np.inf), k=1)

    h = w["model.embed_tokens.weight"][ids]
    for layer in range(config["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        x = _rms_norm(h, w[pre + "input_layernorm.weight"], eps)
        q = (x @ w[pre + "self_attn.q_proj.weight"].T + w.get(pre + "self_attn.q_proj.bias", 0.0))
        q = q.reshape(n, n_head, d).transpose(1, 0, 2)
        k = (x @ w[pre + "self_attn.k_proj.weight"].T + w.get(pre + "self_attn.k_proj.bias", 0.0))
        k = k.reshape(n, n_kv, d).transpose(1, 0, 2)
        v = (x @ w[pre + "self_attn.v_proj.weight"].T + w.get(pre + "self_attn.v_proj.bias", 0.0))
        v = v.reshape(n, n_kv, d).transpose(1, 0, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        group = n_head // n_kv
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)   # GQA: head j uses kv head j // group
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d) + causal
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(n, n_head * d)
        h = h + attn @ w[pre + "self_attn.o_proj.weight"].T

        x = _rms_norm(h, w[pre + "post_attention_layernorm.weight"], eps)
        gate = x @ w[pre + "mlp.gate_proj.weight"].T
        up = x @ w[pre + "mlp.up_proj.weight"].T
        h = h + (_silu(gate) * up) @ w[pre + "mlp.down_proj.weight"].T

    h = _rms_norm(h, w["model.norm.weight"], eps)
    lm_head = w.get("lm_head.weight")
    if lm_head is None or config.get("tie_word_embeddings", False):
        lm_head = w["model.embed_tokens.weight"]
    return h @ lm_head.T
