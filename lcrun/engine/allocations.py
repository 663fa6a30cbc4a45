"""What llama.cpp really allocates for a model and a context, measured through llama-cpp-python.

The model is loaded with `no_alloc` ("only load metadata and simulate memory allocations"): llama.cpp builds every
buffer's layout and the worst-case compute graph, but allocates nothing, so a 33K context costs milliseconds.

Exact bytes come from llama.cpp's own `llama_get_memory_breakdown` (per buffer type: model, context = KV cache,
compute). It is a C++ function returning a `std::map`, not part of the C API: it is called through ctypes with the
x86-64 System V convention for a returned class (the caller's storage as a hidden first argument; aarch64 passes it in
x8 instead) and the map is read with libstdc++'s red-black-tree layout (libc++ lays maps out differently). So it is
used only on x86-64 Linux with libstdc++ (`breakdown_supported()`). Everywhere else, or where the symbol is missing,
the figures come from llama.cpp's log lines of a real allocation, which round to 0.01 MiB; `Allocations.exact` says
which.

The output (logits) buffer is not in the breakdown; its size comes from the log line, so it is exact only to 0.01 MiB.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bindings import MEMORY_BREAKDOWN, function, libllama
from .params import ggml_type

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Allocations:
    """Bytes per buffer-type name (e.g. "CPU"), as llama.cpp allocates them."""

    weights: dict[str, int]
    kv: dict[str, int]
    compute: dict[str, int]
    output: dict[str, int]
    exact: bool
    log: list[str] = field(default_factory=list, repr=False)

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv.values())

    @property
    def compute_bytes(self) -> int:
        return sum(self.compute.values())

    @property
    def output_bytes(self) -> int:
        return sum(self.output.values())

    def per_device(self) -> dict[str, dict[str, int]]:
        """{device: {"weights_bytes", "kv_bytes", "compute_bytes"}}, the buffer types of one device summed: host
        buffers ("CPU_Mapped", "CPU_REPACK", "CUDA_Host", …) count for the CPU; an RPC worker's buffers are named
        like its device ("RPC0[host:port]")."""
        out: dict[str, dict[str, int]] = {}
        for key, table in (("weights_bytes", self.weights), ("kv_bytes", self.kv), ("compute_bytes", self.compute)):
            for buffer, nbytes in table.items():
                device = out.setdefault(device_of_buffer(buffer), {"weights_bytes": 0, "kv_bytes": 0,
                                                                    "compute_bytes": 0})
                device[key] += nbytes
        return out


def device_of_buffer(name: str) -> str:
    """The device a llama.cpp buffer type belongs to, named as lcrun's plan names devices."""
    if name.startswith("RPC") or name.rstrip("0123456789") != name:
        return name  # "RPC0[host:port]", "CUDA0", "Vulkan1", …
    return "CPU"  # "CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host": host memory


class _RbNode(ctypes.Structure):
    pass


# libstdc++ std::map<ggml_backend_buffer_type_t, llama_memory_breakdown_data>: node base, then the value
_RbNode._fields_ = [
    ("color", ctypes.c_int),
    ("parent", ctypes.POINTER(_RbNode)),
    ("left", ctypes.POINTER(_RbNode)),
    ("right", ctypes.POINTER(_RbNode)),
    ("buft", ctypes.c_void_p),
    ("model", ctypes.c_size_t),
    ("context", ctypes.c_size_t),
    ("compute", ctypes.c_size_t),
]


class _StdMap(ctypes.Structure):
    _fields_ = [
        ("key_compare", ctypes.c_size_t),  # std::less, padded to a word
        ("header_color", ctypes.c_int),
        ("root", ctypes.POINTER(_RbNode)),
        ("leftmost", ctypes.POINTER(_RbNode)),
        ("rightmost", ctypes.POINTER(_RbNode)),
        ("node_count", ctypes.c_size_t),
    ]


def breakdown_supported() -> bool:
    """Whether llama_get_memory_breakdown can be read here: x86-64 Linux, llama.cpp built against libstdc++."""
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    libllama()  # llama.cpp's libraries, and the C++ runtime they link, are loaded now
    try:
        return "libstdc++" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _breakdown(ctx: int) -> dict[str, tuple[int, int, int]] | None:
    """{buffer type name: (model, context, compute)} from llama.cpp, or None when the symbol is not exported."""
    try:
        fn = function(MEMORY_BREAKDOWN)
    except AttributeError:
        return None
    buft_name = function("ggml_backend_buft_name")
    result = _StdMap()
    fn(ctypes.byref(result), ctx)
    out: dict[str, tuple[int, int, int]] = {}
    stack = [result.root] if result.root else []
    visited = 0
    while stack and visited <= result.node_count:
        node = stack.pop().contents
        visited += 1
        name = buft_name(node.buft).decode()
        prev = out.get(name, (0, 0, 0))
        out[name] = (prev[0] + node.model, prev[1] + node.context, prev[2] + node.compute)
        stack.extend(child for child in (node.left, node.right) if child)
    if visited != result.node_count:
        raise RuntimeError("unexpected std::map layout in llama_get_memory_breakdown")
    # the map's nodes (a few dozen bytes) are left to leak: freeing them needs libstdc++'s operator delete
    return out


_LOG_PATTERNS = {
    "weights": re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB"),
    "kv": re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB"),
    "compute": re.compile(r"sched_reserve:\s+(\S+) compute buffer size =\s+([\d.]+) MiB"),
    "output": re.compile(r"llama_context:\s+(\S+)\s+output buffer size =\s+([\d.]+) MiB"),
}


def _from_log(lines: list[str], kind: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        match = _LOG_PATTERNS[kind].search(line)
        if match:
            out[match.group(1)] = out.get(match.group(1), 0) + round(float(match.group(2)) * _MIB)
    return out


def allocations_from_log(lines: list[str]) -> Allocations:
    """The sizes llama.cpp logs while it loads a model and creates a context, to 0.01 MiB (0 in `no_alloc` mode)."""
    return Allocations(
        weights=_from_log(lines, "weights"), kv=_from_log(lines, "kv"), compute=_from_log(lines, "compute"),
        output=_from_log(lines, "output"), exact=False, log=lines,
    )


def measure_allocations(
    gguf_path: str | Path,
    *,
    n_ctx: int,
    n_ubatch: int,
    n_batch: int,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    n_seq: int = 1,
    n_gpu_layers: int = 0,
    simulate: bool = True,
    use_breakdown: bool | None = None,
    devices: tuple[str, ...] | None = None,
    tensor_split: tuple[float, ...] | None = None,
) -> Allocations:
    """Load `gguf_path` and create a context as llama.cpp would, and report what it allocates.

    With `simulate` (the default) nothing is allocated: llama.cpp's `no_alloc` mode computes the same sizes, which
    only the breakdown reports. `use_breakdown` None reads it where `breakdown_supported()`; False takes the log path
    (a real allocation, 0.01 MiB resolution) as on every other platform. `devices` and `tensor_split` place the
    layers as the engine does (EngineConfig's fields: RPC workers' devices included)."""
    if use_breakdown is None:
        use_breakdown = breakdown_supported()
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def _capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
    model = ctx = None
    try:
        from .params import model_params
        from .protocol import EngineConfig

        mparams = model_params(EngineConfig(Path(gguf_path), n_ctx, n_gpu_layers=n_gpu_layers, devices=devices,
                                            tensor_split=tensor_split))
        mparams.no_alloc = simulate
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # no_alloc cannot mmap; real loads then use the same buffers
        model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}: {''.join(lines[-3:]).strip()}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = n_seq
        cparams.type_k = ggml_type(type_k)
        cparams.type_v = ggml_type(type_v)
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context: {''.join(lines[-3:]).strip()}")
        text = "".join(lines).splitlines()
        breakdown = _breakdown(ctypes.cast(ctx, ctypes.c_void_p).value or 0) if use_breakdown else None
        output = _from_log(text, "output")
        if breakdown is None:
            if simulate:  # simulated buffers are logged as 0 MiB
                return measure_allocations(
                    gguf_path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_batch=n_batch, type_k=type_k, type_v=type_v,
                    flash_attn=flash_attn, n_seq=n_seq, n_gpu_layers=n_gpu_layers, simulate=False,
                    use_breakdown=False, devices=devices, tensor_split=tensor_split,
                )
            return allocations_from_log(text)
        return Allocations(
            weights={name: m for name, (m, _, _) in breakdown.items() if m},
            kv={name: c for name, (_, c, _) in breakdown.items() if c},
            compute={name: c for name, (_, _, c) in breakdown.items() if c},
            output=output,
            exact=True,
            log=text,
        )
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        if model:
            llama_cpp.llama_model_free(model)
        from .library import quiet_llama_log

        quiet_llama_log(llama_cpp)


def _child(conn: Any, gguf_path: str, options: dict[str, Any]) -> None:
    try:
        conn.send(("ok", measure_allocations(gguf_path, **options)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", str(exc)))
    finally:
        conn.close()


def measure_allocations_isolated(gguf_path: str | Path, **options: Any) -> Allocations:
    """measure_allocations in a child process: a crash inside llama.cpp (seen with the no_alloc dry run on a CUDA
    build) becomes a one-line EngineError instead of taking lcrun down."""
    import multiprocessing

    from ..errors import EngineError

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child, str(gguf_path), options), daemon=True)
    process.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "crash", None
    process.join()
    if status == "ok":
        return payload
    if status == "error":
        raise EngineError(gguf_path, f"llama.cpp's allocation dry run failed: {payload}")
    raise EngineError(gguf_path, f"llama.cpp's allocation dry run crashed (exit {process.exitcode}); "
                                 "the plan stands, unverified")
