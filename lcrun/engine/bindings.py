"""The C functions lcrun calls that llama_cpp does not bind: ggml's backend-device, RPC and abort API and llama.cpp's
memory breakdown, declared in ONE table and reached through libllama's handle (dlsym on it searches the libraries it
links, libggml and libggml-base among them). Never load those libraries by file name: llama-cpp-python ships copies,
not symlinks, of each, so loading `libggml-rpc.so` by name would start a second ggml with its own state.

A symbol is declared (argtypes, restype) the first time it is asked for, so a build without one (RPC off) fails only
where that function is used."""
from __future__ import annotations

import ctypes
from typing import Any

c = ctypes
ABORT_CALLBACK = c.CFUNCTYPE(None, c.c_char_p)   # ggml_abort_callback_t
# llama_get_memory_breakdown(const llama_context *): a C++ function returning a std::map, not part of the C API (see
# engine/allocations.py for how it is called and read)
MEMORY_BREAKDOWN = "_Z26llama_get_memory_breakdownPK13llama_context"

_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    # ggml-backend.h: devices
    "ggml_backend_dev_count": ([], c.c_size_t),
    "ggml_backend_dev_get": ([c.c_size_t], c.c_void_p),
    "ggml_backend_dev_by_name": ([c.c_char_p], c.c_void_p),
    "ggml_backend_dev_name": ([c.c_void_p], c.c_char_p),
    "ggml_backend_dev_description": ([c.c_void_p], c.c_char_p),
    "ggml_backend_dev_type": ([c.c_void_p], c.c_int),
    "ggml_backend_dev_memory": ([c.c_void_p, c.POINTER(c.c_size_t), c.POINTER(c.c_size_t)], None),
    "ggml_backend_reg_dev_count": ([c.c_void_p], c.c_size_t),
    "ggml_backend_reg_dev_get": ([c.c_void_p, c.c_size_t], c.c_void_p),
    "ggml_backend_buft_name": ([c.c_void_p], c.c_char_p),
    # ggml-rpc.h
    "ggml_backend_rpc_add_server": ([c.c_char_p], c.c_void_p),
    "ggml_backend_rpc_get_device_memory": ([c.c_char_p, c.c_uint32, c.POINTER(c.c_size_t), c.POINTER(c.c_size_t)],
                                           None),
    "ggml_backend_rpc_start_server": ([c.c_char_p, c.c_char_p, c.c_size_t, c.c_size_t, c.c_void_p], None),
    # ggml.h
    "ggml_set_abort_callback": ([ABORT_CALLBACK], c.c_void_p),
    # the std::map is returned by value: the caller passes its storage as a hidden first argument
    MEMORY_BREAKDOWN: ([c.c_void_p, c.c_void_p], None),
}
_declared: dict[str, Any] = {}


def libllama() -> ctypes.CDLL:
    """libllama's handle, as llama_cpp loaded it."""
    from llama_cpp import llama_cpp as bindings

    return bindings._lib


def function(name: str) -> Any:
    """The C function `name` of the table, declared; AttributeError when this build does not export it."""
    fn = _declared.get(name)
    if fn is None:
        argtypes, restype = _SIGNATURES[name]
        fn = getattr(libllama(), name)
        fn.argtypes, fn.restype = argtypes, restype
        _declared[name] = fn
    return fn


class _Table:
    """`ggml.name(...)` for `function(name)(...)`."""

    def __getattr__(self, name: str) -> Any:
        if name not in _SIGNATURES:
            raise AttributeError(f"{name} is not in lcrun's bindings table (lcrun/engine/bindings.py)")
        return function(name)


ggml = _Table()
