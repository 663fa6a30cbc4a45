"""ggml's backend devices (ggml-backend.h, through lcrun's bindings table): what llama.cpp can use in this process,
and the NULL-terminated device list `llama_model_params.devices` takes."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from lcrun.errors import EngineError

from .bindings import ggml
from .library import start_llama

_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class BackendDevice:
    name: str              # what EngineConfig.devices takes
    description: str
    kind: str              # "cpu" | "gpu" | "igpu" | "accel" | "meta"
    free_bytes: int
    total_bytes: int


def list_devices() -> list[BackendDevice]:
    """The ggml backend devices llama.cpp can use in this process (the CPU included)."""
    import llama_cpp

    start_llama(llama_cpp)
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(BackendDevice(ggml.ggml_backend_dev_name(dev).decode(),
                                 ggml.ggml_backend_dev_description(dev).decode(),
                                 _DEVICE_KINDS.get(ggml.ggml_backend_dev_type(dev), "other"), free.value, total.value))
    return out


def device_list(names: tuple[str, ...]) -> ctypes.Array:
    """llama_model_params.devices: the named devices' handles, NULL-terminated."""
    handles = []
    for name in names:
        dev = ggml.ggml_backend_dev_by_name(name.encode())
        if not dev:
            from .rpc import device_handle  # an RPC worker's device ("RPC0[host:port]"): ggml connects to it now

            dev = device_handle(name)
        if not dev:
            known = ", ".join(d.name for d in list_devices())
            raise EngineError(name, f"no such ggml device (llama.cpp has: {known})")
        handles.append(dev)
    return (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
