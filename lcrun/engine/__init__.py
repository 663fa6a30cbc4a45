"""The engine boundary: the only package of the application that imports llama_cpp (inside its functions).

`protocol` says what an engine is (configuration, streamed records, the interface); `runtime` is the llama.cpp
engine; `quantize` and `allocations` drive llama.cpp for the converter and the planner."""
from __future__ import annotations

from .quantize import llama_quant_types, quantize_gguf

__all__ = ["llama_quant_types", "quantize_gguf"]
