"""The engine boundary: the only package of the application that imports llama_cpp (inside its functions).

`protocol` says what an engine is (configuration, sampler settings, the step API's records, the interface);
`runtime` is the llama.cpp engine, composed of `library`, `params`, `backends`, `bindings`, `vocab`, `sequences`,
`step`, `sampler` and `state` (`vocab` also loads a GGUF's vocabulary alone, for token counts without the weights);
`quantize` and `allocations` drive llama.cpp for the converter and the planner; `rpc` is ggml's RPC backend. It generates nothing itself: lcrun.generation's decode loop drives the step API."""
from __future__ import annotations

from .quantize import llama_quant_types, quantize_gguf

__all__ = ["llama_quant_types", "quantize_gguf"]
