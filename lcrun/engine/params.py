"""The llama_model_params and llama_context_params the engine loads with: llama-cpp-python 0.3.36's `Llama`'s (the
parity test holds the engine to its tokens and struct fields), except the YaRN factors, -1, so the GGUF's own values
are used; the device list and weight repacking come from `EngineConfig`."""
from __future__ import annotations

import ctypes
import os
from typing import Any

from lcrun.errors import EngineError

from .protocol import EngineConfig


def ggml_type(name: str) -> int:
    """A KV cache type's name ("f16", "q8_0") as ggml_type's value."""
    from gguf import GGMLQuantizationType  # the enum values are ggml_type's

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        raise EngineError(str(name), "not a ggml type for the KV cache (try f16, q8_0, q4_0)") from None


def amx_build() -> bool:
    """Whether this llama.cpp's CPU backend multiplies with AMX (built for, and running on, a CPU that has it)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def weight_repacking(requested: bool | None = None) -> bool:
    """llama_model_params.use_extra_bufts for EngineConfig.repack: what was asked, else on unless AMX would be used
    (its matmul crashes: ggml-org/llama.cpp#20824)."""
    return requested if requested is not None else not amx_build()


def model_params(config: EngineConfig) -> Any:
    """The llama_model_params the engine loads its model with: what llama-cpp-python's Llama passes, plus the
    device list (kept alive as the struct's `keep` attribute) and the weight repacking of `weight_repacking`."""
    import llama_cpp as lc

    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if config.n_gpu_layers == -1 else config.n_gpu_layers
    params.split_mode = lc.LLAMA_SPLIT_MODE_LAYER
    params.main_gpu = 0
    params.load_mode = lc.LLAMA_LOAD_MODE_MMAP
    params.vocab_only = False
    params.use_extra_bufts = weight_repacking(config.repack)
    params.keep = []
    if config.devices is not None:
        from .backends import device_list

        devices = device_list(config.devices)
        params.keep.append(devices)
        params.devices = ctypes.addressof(devices)
    if config.tensor_split is not None:
        limit = lc.llama_max_devices()
        if len(config.tensor_split) > limit:
            raise EngineError(f"{len(config.tensor_split)} devices", f"llama.cpp splits over at most {limit}")
        split = (ctypes.c_float * limit)(*config.tensor_split)
        params.keep.append(split)
        params.tensor_split = split
    return params


def context_params(config: EngineConfig) -> Any:
    """The llama_context_params the engine creates its context with: what llama-cpp-python's Llama passes (same
    thread and batch defaults) except the YaRN factors, -1 (Llama passes 1/32/1, which would override the GGUF's), and
    n_seq sequences."""
    import llama_cpp as lc

    params = lc.llama_context_default_params()
    n_batch = min(config.n_ctx, config.n_batch)
    params.n_ctx = config.n_ctx
    params.n_batch = n_batch
    params.n_ubatch = min(n_batch, config.n_ubatch)
    params.n_seq_max = config.n_seq
    params.kv_unified = config.kv_unified
    params.n_threads = config.n_threads or max((os.cpu_count() or 2) // 2, 1)
    params.n_threads_batch = config.n_threads_batch or os.cpu_count() or 1
    params.rope_scaling_type = lc.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
    params.pooling_type = lc.LLAMA_POOLING_TYPE_UNSPECIFIED
    params.attention_type = lc.LLAMA_ATTENTION_TYPE_UNSPECIFIED
    params.rope_freq_base = config.rope_freq_base or 0.0
    params.rope_freq_scale = config.rope_freq_scale or 0.0
    params.yarn_ext_factor = -1.0
    params.yarn_attn_factor = -1.0
    params.yarn_beta_fast = -1.0
    params.yarn_beta_slow = -1.0
    params.yarn_orig_ctx = 0
    params.embeddings = False
    params.offload_kqv = True
    params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn
                              else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.type_k = ggml_type(config.type_k)
    params.type_v = ggml_type(config.type_v)
    params.no_perf = False
    return params
