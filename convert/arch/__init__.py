"""Architecture adapters, keyed by `architectures[0]` of config.json. Adding an architecture is one module here."""
from __future__ import annotations

from .base import ModelAdapter, TensorPlan, adapter_for, supported_architectures
from . import llama as _llama  # noqa: F401  (registers LlamaForCausalLM, MistralForCausalLM)
from . import qwen2 as _qwen2  # noqa: F401  (registers Qwen2ForCausalLM)

__all__ = ["ModelAdapter", "TensorPlan", "adapter_for", "supported_architectures"]
