"""RoPE settings of a Hugging Face config, validated, and their GGUF form.

Both config forms are read: the legacy one (`rope_theta` + `rope_scaling` with `type` or `rope_type`) and the
transformers >= 5 one (`rope_parameters`, which also holds `rope_theta`). Anything we cannot express exactly in GGUF is
refused: a model that silently loses its scaling chats fine at 2K tokens and is broken at 20K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, UnsupportedModelError

SUPPORTED_KINDS = ("none", "llama3", "linear", "yarn")

# transformers' defaults for YaRN (modeling_rope_utils._compute_yarn_parameters); llama.cpp uses the same ones
YARN_DEFAULT_BETA_FAST = 32.0
YARN_DEFAULT_BETA_SLOW = 1.0


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    kind: str = "none"
    factor: float = 1.0
    original_context: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _positive_finite(value: Any, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(path, f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise CheckpointError(path, f"{what} must be a finite number > 0, got {value!r}")
    return number


def _scaling_dict(config: dict[str, Any], path: Path) -> tuple[Any, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either config form."""
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise CheckpointError(path, f"rope_parameters must be an object, got {params!r}")
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            raise UnsupportedModelError(path, "per-layer-type rope_parameters are not supported")
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (None if kind == "default" else params)
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(path, f"rope_scaling must be an object or null, got {scaling!r}")
    return config.get("rope_theta", 10000.0), scaling


def rope_from_config(config: dict[str, Any], config_path: Path) -> RopeSpec:
    theta_value, scaling = _scaling_dict(config, config_path)
    theta = _positive_finite(theta_value, "rope_theta", config_path)
    if not scaling:
        return RopeSpec(theta=theta)

    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return RopeSpec(theta=theta)
    if kind not in ("llama3", "linear", "yarn"):
        raise UnsupportedModelError(
            config_path,
            f"RoPE scaling type {kind!r} cannot be expressed in GGUF for llama.cpp "
            f"(supported: {', '.join(SUPPORTED_KINDS[1:])}); converting without it would change the model "
            "beyond its original context",
        )
    factor = _positive_finite(scaling.get("factor"), f"rope scaling 'factor' ({kind})", config_path)

    if kind == "linear":
        return RopeSpec(theta=theta, kind="linear", factor=factor)

    original = scaling.get("original_max_position_embeddings")
    if kind == "llama3":
        # Llama 3.1's original context lives in the scaling dict, not at the top level of the config
        orig = int(_positive_finite(original, "rope scaling 'original_max_position_embeddings'", config_path))
        low = _positive_finite(scaling.get("low_freq_factor"), "rope scaling 'low_freq_factor'", config_path)
        high = _positive_finite(scaling.get("high_freq_factor"), "rope scaling 'high_freq_factor'", config_path)
        if high <= low:
            raise CheckpointError(config_path, f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
        return RopeSpec(theta=theta, kind="llama3", factor=factor, original_context=orig,
                        low_freq_factor=low, high_freq_factor=high)

    # yarn
    if original is None:
        # transformers falls back to max_position_embeddings for yarn
        original = config.get("max_position_embeddings")
    orig = int(_positive_finite(original, "yarn 'original_max_position_embeddings'", config_path))
    default_attention = 0.1 * math.log(factor) + 1.0
    attention = scaling.get("attention_factor")
    if attention is not None and not math.isclose(float(attention), default_attention, rel_tol=1e-6):
        raise UnsupportedModelError(
            config_path,
            f"yarn attention_factor {attention} differs from the default 0.1*ln(factor)+1 = {default_attention:.6f}; "
            "llama.cpp's llama architecture cannot express that",
        )
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key) not in (None, 0, 1, 1.0, 0.0):
            raise UnsupportedModelError(config_path, f"yarn {key}={scaling[key]} is not supported for the llama architecture")
    if scaling.get("truncate") is False:
        raise UnsupportedModelError(config_path, "yarn with truncate=false is not supported by llama.cpp")
    beta_fast = _positive_finite(scaling.get("beta_fast", YARN_DEFAULT_BETA_FAST), "yarn 'beta_fast'", config_path)
    beta_slow = _positive_finite(scaling.get("beta_slow", YARN_DEFAULT_BETA_SLOW), "yarn 'beta_slow'", config_path)
    return RopeSpec(theta=theta, kind="yarn", factor=factor, original_context=orig,
                    beta_fast=beta_fast, beta_slow=beta_slow)


def llama3_rope_factors(spec: RopeSpec, head_dim: int) -> np.ndarray:
    """The `rope_freqs.weight` llama.cpp divides each frequency by (Meta's llama3 scaling, per frequency)."""
    assert spec.kind == "llama3" and spec.original_context and spec.low_freq_factor and spec.high_freq_factor
    inv_freq = 1.0 / (spec.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = spec.original_context / spec.low_freq_factor
    high_freq_wavelen = spec.original_context / spec.high_freq_factor
    smooth = (spec.original_context / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    factors = np.where(
        wavelen < high_freq_wavelen,
        1.0,
        np.where(wavelen > low_freq_wavelen, spec.factor, 1.0 / ((1 - smooth) / spec.factor + smooth)),
    )
    return factors.astype(np.float32)
