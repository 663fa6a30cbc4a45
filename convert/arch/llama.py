"""Llama 2/3/3.1/3.2/3.3, Gradient's long-context Llama-3 models, and Mistral (same graph in llama.cpp)."""
from __future__ import annotations

import gguf

from .base import ModelAdapter, register


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaAdapter(ModelAdapter):
    gguf_arch = gguf.MODEL_ARCH.LLAMA
