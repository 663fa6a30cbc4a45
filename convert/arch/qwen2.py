"""Qwen2 / Qwen2.5: the llama graph with Q/K/V biases and NEOX-style RoPE (no Q/K permutation)."""
from __future__ import annotations

import gguf

from .base import ModelAdapter, register


@register("Qwen2ForCausalLM")
class Qwen2Adapter(ModelAdapter):
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    permute_qk = False

    def required_tensors(self) -> list[str]:
        names = super().required_tensors()
        for i in range(self.n_layer):
            names += [f"blk.{i}.attn_{x}.bias" for x in "qkv"]
        return names
