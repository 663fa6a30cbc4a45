"""What every architecture adapter provides: hyper-parameters, tensor names and expected shapes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import gguf
import numpy as np

from ..errors import CheckpointError, UnsupportedModelError
from ..rope import RopeSpec, rope_from_config

_REGISTRY: dict[str, type["ModelAdapter"]] = {}


def register(*architectures: str) -> Callable[[type["ModelAdapter"]], type["ModelAdapter"]]:
    def wrap(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for name in architectures:
            _REGISTRY[name] = cls
        return cls
    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(config: dict[str, Any], config_path: Path) -> "ModelAdapter":
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(config_path, "no 'architectures' list; cannot tell which model this is")
    cls = _REGISTRY.get(archs[0])
    if cls is None:
        raise UnsupportedModelError(
            config_path, f"architecture {archs[0]} is not supported (supported: {', '.join(supported_architectures())})"
        )
    return cls(config, config_path)


@dataclass
class TensorPlan:
    """One output tensor: where its rows come from and how they are laid out."""
    name: str                                # GGUF tensor name
    shape: tuple[int, ...]                   # numpy order: (rows, cols) or (n,)
    source: str | None = None                # HF tensor name; None for generated tensors
    row_index: np.ndarray | None = None      # output row i comes from source row row_index[i] (Q/K permutation)
    rows_per_group: int = 1                  # chunk boundaries must fall on multiples of this (keeps gathers local)
    data: np.ndarray | None = None           # generated tensors (rope_freqs) carry their data
    keep_f32: bool = False                   # norms, biases, rope_freqs: llama.cpp keeps 1-D tensors in F32


def _int_field(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(path, f"'{key}' must be a positive integer, got {value!r}")
    return value


def rope_permutation(n_head: int, head_dim: int) -> np.ndarray:
    """Row order that turns HF's rotate-half Q/K layout into llama.cpp's interleaved pairs."""
    rows = np.arange(n_head * head_dim).reshape(n_head, 2, head_dim // 2)
    return rows.swapaxes(1, 2).reshape(-1)


class ModelAdapter:
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    permute_qk: ClassVar[bool] = True  # llama.cpp's llama arch uses interleaved RoPE pairs

    def __init__(self, config: dict[str, Any], config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        p = config_path
        self.hidden = _int_field(config, "hidden_size", p)
        self.n_layer = _int_field(config, "num_hidden_layers", p)
        self.n_head = _int_field(config, "num_attention_heads", p)
        self.n_head_kv = _int_field(config, "num_key_value_heads", p, default=self.n_head)
        self.ffn = _int_field(config, "intermediate_size", p)
        self.vocab_size = _int_field(config, "vocab_size", p)
        self.context_length = _int_field(config, "max_position_embeddings", p)
        head_dim = config.get("head_dim")
        self.head_dim = _int_field(config, "head_dim", p) if head_dim is not None else self.hidden // self.n_head
        if head_dim is None and self.hidden % self.n_head:
            raise CheckpointError(p, f"hidden_size {self.hidden} is not divisible by num_attention_heads {self.n_head}")
        if self.n_head % self.n_head_kv:
            raise CheckpointError(p, f"num_attention_heads {self.n_head} is not a multiple of num_key_value_heads {self.n_head_kv}")
        if self.head_dim % 2:
            raise CheckpointError(p, f"head_dim {self.head_dim} must be even for RoPE")
        eps = config.get("rms_norm_eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise CheckpointError(p, f"'rms_norm_eps' must be a number > 0, got {eps!r}")
        self.rms_norm_eps = float(eps)
        self.tie_embeddings = bool(config.get("tie_word_embeddings", False))
        self.rope: RopeSpec = rope_from_config(config, p)
        self._names = gguf.get_tensor_name_map(self.gguf_arch, self.n_layer)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # ---- tensors -------------------------------------------------------------------------------------------------
    def expected_shape(self, gguf_name: str) -> tuple[int, ...] | None:
        """Shape (numpy order) the config implies for a tensor, or None when the adapter does not constrain it."""
        base = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else gguf_name
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {
            "token_embd.weight": (self.vocab_size, self.hidden),
            "output.weight": (self.vocab_size, self.hidden),
            "output_norm.weight": (self.hidden,),
            "attn_norm.weight": (self.hidden,),
            "ffn_norm.weight": (self.hidden,),
            "attn_q.weight": (q, self.hidden),
            "attn_k.weight": (kv, self.hidden),
            "attn_v.weight": (kv, self.hidden),
            "attn_output.weight": (self.hidden, q),
            "ffn_gate.weight": (self.ffn, self.hidden),
            "ffn_up.weight": (self.ffn, self.hidden),
            "ffn_down.weight": (self.hidden, self.ffn),
            "attn_q.bias": (q,),
            "attn_k.bias": (kv,),
            "attn_v.bias": (kv,),
        }.get(base)

    def required_tensors(self) -> list[str]:
        names = ["token_embd.weight", "output_norm.weight"]
        if not self.tie_embeddings:
            names.append("output.weight")
        for i in range(self.n_layer):
            names += [f"blk.{i}.{n}.weight" for n in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
        return names

    def gguf_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor a converted file holds, with its shape, from the config alone (for estimates before download)."""
        shapes = []
        for name in self.required_tensors():
            shape = self.expected_shape(name)
            assert shape is not None, name
            shapes.append((name, shape))
        return shapes + [(plan.name, plan.shape) for plan in self.extra_tensors()]

    def skip_source(self, hf_name: str) -> bool:
        return hf_name.endswith(".rotary_emb.inv_freq")

    def plan_tensor(self, hf_name: str, shape: tuple[int, ...], shard: Path) -> TensorPlan | None:
        if self.skip_source(hf_name):
            return None
        gguf_name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedModelError(shard, f"tensor {hf_name} has no GGUF name for {self.arch_name}")
        if self.tie_embeddings and gguf_name == "output.weight":
            return None  # llama.cpp reuses token_embd when output is absent
        expected = self.expected_shape(gguf_name)
        if expected is not None and tuple(shape) != expected:
            raise CheckpointError(
                shard, f"tensor {hf_name} has shape {list(shape)} but config.json implies {list(expected)}")
        plan = TensorPlan(name=gguf_name, shape=tuple(shape), source=hf_name, keep_f32=len(shape) == 1)
        base = gguf_name.split(".", 2)[-1]
        if self.permute_qk and base in ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias"):
            heads = self.n_head if base.startswith("attn_q") else self.n_head_kv
            plan.row_index = rope_permutation(heads, self.head_dim)
            plan.rows_per_group = self.head_dim
        return plan

    def extra_tensors(self) -> list[TensorPlan]:
        from ..rope import llama3_rope_factors
        if self.rope.kind != "llama3":
            return []
        factors = llama3_rope_factors(self.rope, self.head_dim)
        return [TensorPlan(name=gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                           shape=factors.shape, data=factors, keep_f32=True)]

    # ---- metadata ------------------------------------------------------------------------------------------------
    def add_hparams(self, writer: gguf.GGUFWriter, *, context_length: int, rope_theta: float) -> None:
        writer.add_context_length(context_length)
        writer.add_embedding_length(self.hidden)
        writer.add_block_count(self.n_layer)
        writer.add_feed_forward_length(self.ffn)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(self.rms_norm_eps)
        writer.add_vocab_size(self.vocab_size)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_rope_freq_base(rope_theta)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        rope = self.rope
        if rope.kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope.factor)
        elif rope.kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(rope.factor)
            writer.add_rope_scaling_orig_ctx_len(rope.original_context)
            keys = gguf.Keys.Rope
            writer.add_float32(keys.SCALING_YARN_BETA_FAST.format(arch=self.arch_name), rope.beta_fast)
            writer.add_float32(keys.SCALING_YARN_BETA_SLOW.format(arch=self.arch_name), rope.beta_slow)
        # llama3 scaling travels as the rope_freqs tensor (extra_tensors); plain theta needs nothing more
