"""The engine boundary: the only package of the application that imports llama_cpp (inside its functions)."""
from __future__ import annotations

from .quantize import llama_quant_types, quantize_gguf

__all__ = ["llama_quant_types", "quantize_gguf"]
