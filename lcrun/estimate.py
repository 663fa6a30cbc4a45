"""Memory plans: weights, KV cache, compute and output buffers per device, for a model at a quant, context length
and KV type — before anything is downloaded. Pure: no llama_cpp, no network (callers bring the ModelSpec)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


from .devices import Device
from .memory_model import (ModelShape, compute_buffer_bytes, kv_cache_bytes, output_buffer_bytes, validate_kv)
from .model_spec import ModelSpec
from .quant_mix import llama_tensor_types, quantized_nbytes

GIB = 1 << 30
GPU_RESERVE = 1 * GIB  # per GPU, like llama.cpp's fit margin
CTX_STEP = 256


@dataclass
class DeviceUse:
    name: str
    bytes: int
    free_bytes: int


@dataclass
class Plan:
    model: str
    quant: str
    ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_ubatch: int
    n_seq: int
    n_gpu_layers: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    output_bytes: int
    total_bytes: int
    devices: list[DeviceUse]
    fits: bool
    binding: str = ""                        # which constraint decides, in words
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_shape(spec: ModelSpec) -> ModelShape:
    return ModelShape(n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head, n_head_kv=spec.n_head_kv,
                      head_dim_k=spec.head_dim, head_dim_v=spec.head_dim, n_ff=spec.n_ff, n_vocab=spec.n_vocab,
                      n_ctx_train=spec.n_ctx_train)


def tensor_bytes(spec: ModelSpec, quant: str) -> dict[str, int]:
    """Bytes of every tensor at `quant`: exact from a GGUF file, else llama.cpp's own per-tensor type choice."""
    if spec.file_tensor_bytes is not None:
        return dict(spec.file_tensor_bytes)
    types = llama_tensor_types(spec.arch, spec.tensors, quant, n_layer=spec.n_layer, n_head=spec.n_head,
                               n_head_kv=spec.n_head_kv)
    return {name: quantized_nbytes(shape, types[name]) for name, shape in spec.tensors}


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        return int(name.split(".", 2)[1])
    return None


def _split_weights(spec: ModelSpec, sizes: dict[str, int], n_gpu_layers: int) -> tuple[int, int]:
    """(bytes on the GPU, bytes in host memory) when llama.cpp offloads n_gpu_layers: the last repeating layers,
    and the output layer once every repeating layer is on the GPU; token_embd always stays in host memory."""
    first_gpu_layer = spec.n_layer - min(n_gpu_layers, spec.n_layer)
    gpu = 0
    for name, nbytes in sizes.items():
        layer = _layer_of(name)
        if (layer is not None and layer >= first_gpu_layer) or (name.startswith("output") and n_gpu_layers > spec.n_layer):
            gpu += nbytes
    return gpu, sum(sizes.values()) - gpu


def plan_memory(spec: ModelSpec, quant: str, ctx: int, devices: list[Device], *, type_k: str = "f16",
                type_v: str = "f16", flash_attn: bool = True, n_ubatch: int = 512, n_batch: int = 2048,
                n_seq: int = 1, n_gpu_layers: int | None = None) -> Plan:
    """One plan. n_gpu_layers None = as many layers as fit the first GPU (all when they do); the layers and their
    KV cache live on the GPU, the rest in host memory."""
    shape = model_shape(spec)
    validate_kv(shape, type_k, type_v, flash_attn)
    gpus = [d for d in devices if d.is_gpu]
    cpu = next(d for d in devices if not d.is_gpu)
    n_offloadable = spec.n_layer + 1

    sizes = tensor_bytes(spec, quant)
    weights = sum(sizes.values())
    kv_total = kv_cache_bytes(shape, n_ctx=ctx, n_seq=n_seq, type_k=type_k, type_v=type_v, flash_attn=flash_attn)
    kv_per_layer = kv_total // spec.n_layer
    # calibrated against llama.cpp's CPU backend; CUDA's graph allocator is not yet measured (noted in the plan)
    compute = compute_buffer_bytes(shape, n_ctx=ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k,
                                   type_v=type_v, device="cpu")
    output = output_buffer_bytes(shape, n_ctx=ctx, n_batch=n_batch, n_seq=n_seq)

    def gpu_need(layers: int) -> int:
        if not layers:
            return 0
        return _split_weights(spec, sizes, layers)[0] + kv_per_layer * min(layers, spec.n_layer) + compute + GPU_RESERVE

    if not gpus:
        n_gpu_layers = 0
    elif n_gpu_layers is None:
        n_gpu_layers = next((n for n in range(n_offloadable, -1, -1) if gpu_need(n) <= gpus[0].free_bytes), 0)
    n_gpu_layers = max(0, min(n_gpu_layers, n_offloadable))

    uses: list[DeviceUse] = []
    binding = []
    for i, gpu in enumerate(gpus):
        need = gpu_need(n_gpu_layers) if i == 0 else 0
        uses.append(DeviceUse(gpu.name, need, gpu.free_bytes))
        if need > gpu.free_bytes:
            binding.append(f"{gpu.name} needs {need / GIB:.1f} GiB, {gpu.free_bytes / GIB:.1f} GiB free")
    kv_gpu = kv_per_layer * min(n_gpu_layers, spec.n_layer)
    host = _split_weights(spec, sizes, n_gpu_layers)[1] + (kv_total - kv_gpu) + output + (0 if n_gpu_layers else compute)
    uses.append(DeviceUse(cpu.name, host, cpu.free_bytes))
    if host > cpu.free_bytes:
        binding.append(f"RAM needs {host / GIB:.1f} GiB, {cpu.free_bytes / GIB:.1f} GiB free")
    notes = ["GPU compute buffer estimated with the CPU-calibrated model"] if n_gpu_layers else []
    return Plan(model=spec.name, quant=quant.upper(), ctx=ctx, type_k=type_k, type_v=type_v, flash_attn=flash_attn,
                n_ubatch=n_ubatch, n_seq=n_seq, n_gpu_layers=n_gpu_layers, weights_bytes=weights, kv_bytes=kv_total,
                compute_bytes=compute, output_bytes=output, total_bytes=weights + kv_total + compute + output,
                devices=uses, fits=not binding, binding="; ".join(binding), notes=notes)


def largest_fitting_ctx(spec: ModelSpec, quant: str, devices: list[Device], *, max_ctx: int, **options: Any) -> int:
    """The largest multiple of 256 (≤ max_ctx) whose plan fits, 0 if none does. Memory grows with ctx: bisect."""
    lo, hi = 0, max_ctx // CTX_STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_memory(spec, quant, mid * CTX_STEP, devices, **options).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * CTX_STEP


def estimate_grid(spec: ModelSpec, quants: Sequence[str], contexts: Sequence[int], kv_pairs: Sequence[tuple[str, str]],
                  devices: list[Device], *, max_ctx: int, **options: Any) -> tuple[list[Plan], dict[tuple[str, str], int]]:
    """Plans for every quant × KV type × context, and per quant and KV type the largest context that fits."""
    plans: list[Plan] = []
    largest: dict[tuple[str, str], int] = {}
    for quant in quants:
        for type_k, type_v in kv_pairs:
            kv_options = dict(options, type_k=type_k, type_v=type_v)
            plans += [plan_memory(spec, quant, ctx, devices, **kv_options) for ctx in contexts]
            kv = type_k if type_k == type_v else f"{type_k}/{type_v}"
            largest[(quant.upper(), kv)] = largest_fitting_ctx(spec, quant, devices, max_ctx=max_ctx, **kv_options)
    return plans, largest


def context_ladder(max_ctx: int) -> list[int]:
    """4K, 8K, 16K, … up to and including the model's maximum."""
    ladder, ctx = [], 4096
    while ctx < max_ctx:
        ladder.append(ctx)
        ctx *= 2
    return [*ladder, max_ctx]
