"""The engine boundary: the one module of the application that imports llama_cpp."""
from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import EngineError

_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
_TENSOR_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")
_quantize_lock = threading.Lock()


def llama_quant_types() -> dict[str, int]:
    """llama.cpp's quantization types by their usual names (Q4_K_M, IQ4_XS, …) → llama_ftype value."""
    import llama_cpp

    return {name[len(_FTYPE_PREFIX):]: getattr(llama_cpp, name)
            for name in dir(llama_cpp) if name.startswith(_FTYPE_PREFIX)}


def quantize_gguf(src: Path, dst: Path, qtype: str, *, threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None, pure: bool = False) -> None:
    """Quantize `src` to `dst` with llama.cpp's own quantizer (`llama_model_quantize`).

    `dst` is written as-is; callers make it atomic. Progress counts tensors, parsed from llama.cpp's own log."""
    import llama_cpp

    types = llama_quant_types()
    key = qtype.upper()
    if key not in types:
        raise EngineError(None, f"unknown quant type {qtype!r} (llama.cpp has: {', '.join(sorted(types))})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[key]
    params.nthread = threads or (os.cpu_count() or 1)
    params.pure = pure

    log_tail: list[bytes] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if text:
            log_tail.append(text)
            del log_tail[:-20]
            match = _TENSOR_LINE.search(text)
            if match and progress:
                progress(int(match.group(1)), int(match.group(2)))

    with _quantize_lock:  # llama.cpp's logger is process-wide
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
        finally:
            from .library import quiet_llama_log

            quiet_llama_log(llama_cpp)
    if rc != 0:
        detail = next((t.decode(errors="replace").strip() for t in reversed(log_tail) if b"error" in t.lower()), "")
        raise EngineError(src, f"llama.cpp failed to quantize to {key}" + (f": {detail}" if detail else ""))
