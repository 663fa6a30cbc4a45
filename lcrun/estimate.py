"""Memory estimates: weights, KV cache, compute and output buffers per device, for a model at a quant, context length
and KV type — before anything is downloaded. Pure: no llama_cpp, no network (callers bring the ModelSpec)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from typing import Any

from .devices import Device
from .memory_model import (ModelShape, compute_buffer_bytes, kv_cache_bytes_per_layer, kv_type_name,
                           output_buffer_bytes, validate_kv, weights_bytes)
from .model_spec import ModelSpec
from .quant_mix import llama_tensor_types, quantized_nbytes

GIB = 1 << 30
GPU_RESERVE = 1 * GIB  # per GPU, like llama.cpp's fit margin
CTX_STEP = 256
SCHED_COPIES = 4       # GGML_SCHED_MAX_COPIES: input copies kept per device under pipeline parallelism


@dataclass
class DeviceUse:
    name: str
    bytes: int
    free_bytes: int
    host: str = ""                 # "" this machine; else the RPC worker's HOST:PORT
    layers: int = 0                # repeating layers it holds
    first_layer: int = 0           # the first of them
    output_layer: bool = False     # it holds the output layer (output_norm, output)
    weights_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0


@dataclass
class MemoryEstimate:
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
    # llama.cpp's device list and tensor_split: the devices that hold layers past the CPU's, in llama.cpp's order
    # (RPC workers, then this machine's GPUs), and how many of the offloaded layers (the output layer counting as
    # one) each holds
    offload: list[str] = field(default_factory=list)
    tensor_split: list[int] = field(default_factory=list)
    shortfall_bytes: int = 0                 # memory missing over all hosts together (0 when the total would do)

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


@dataclass(frozen=True)
class _Slots:
    """What llama.cpp places as units, in its order: slot i < n_layer is repeating layer i (its weights and KV cache),
    slot n_layer the output layer (output_norm, output). The input layer (token_embd) always stays on the CPU; a
    tensor shared by every layer (rope_freqs) is copied to each device that holds layers. Weights are summed as a
    device buffer lays them out (each tensor aligned to 32 bytes, ggml's CPU alignment)."""
    weights: list[int]
    kv: list[int]
    input: int
    shared: int

    @property
    def n(self) -> int:
        return len(self.weights)


def _slots(spec: ModelSpec, sizes: dict[str, int], kv_per_layer: list[int]) -> _Slots:
    weights = [0] * (spec.n_layer + 1)
    input_bytes = shared = 0
    for name, nbytes in sizes.items():
        aligned = weights_bytes([nbytes])
        layer = _layer_of(name)
        if layer is not None:
            weights[layer] += aligned
        elif name.startswith("output"):
            weights[spec.n_layer] += aligned
        elif name.startswith("rope_freqs"):
            shared += aligned
        else:
            input_bytes += aligned
    return _Slots(weights, [*kv_per_layer, 0], input_bytes, shared)


@dataclass
class _Holder:
    """A device in llama.cpp's placement order (this machine's CPU first), the slots it holds, and what it costs."""
    device: Device
    first: int = 0
    count: int = 0
    weights: int = 0
    kv: int = 0
    compute: int = 0
    fixed: int = 0                 # the CPU: token embeddings and the output buffer; a GPU: its reserve

    @property
    def need(self) -> int:
        return self.weights + self.kv + self.compute + self.fixed


class _Costs:
    """Bytes a device needs for a run of slots: weights, KV, its compute buffer and fixed costs."""

    def __init__(self, spec: ModelSpec, slots: _Slots, output_bytes: int, compute: Any, cpu: Device) -> None:
        self.slots, self.n_layer, self.cpu = slots, spec.n_layer, cpu
        self.output_bytes = output_bytes
        self._compute_fn = compute
        self._compute: dict[tuple[bool, bool, bool, bool], int] = {}
        self._w = [0, *accumulate(slots.weights)]
        self._kv = [0, *accumulate(slots.kv)]

    def compute(self, layers: bool, output_layer: bool, input_layer: bool, pipeline: bool) -> int:
        key = (layers, output_layer, input_layer, pipeline)
        if key not in self._compute:
            self._compute[key] = self._compute_fn(layers=layers, output_layer=output_layer, input_layer=input_layer,
                                                  pipeline_copies=SCHED_COPIES if pipeline else 1)
        return self._compute[key]

    def holder(self, device: Device, first: int, count: int, *, pipeline: bool) -> _Holder:
        stop = first + count
        has_layers = first < min(stop, self.n_layer)
        has_output = count > 0 and stop == self.slots.n
        weights = self._w[stop] - self._w[first] + (self.slots.shared if has_layers else 0)
        is_cpu = device is self.cpu
        fixed = (self.slots.input + self.output_bytes) if is_cpu else (GPU_RESERVE if device.is_gpu else 0)
        compute = self.compute(has_layers, has_output, is_cpu, pipeline) if (is_cpu or count) else 0
        return _Holder(device, first, count, weights, self._kv[stop] - self._kv[first], compute, fixed)


def _fill(costs: _Costs, devices: list[Device], first: int, ratio: float, *, pipeline: bool) -> list[_Holder] | None:
    """Slots first.. over `devices` in order, each taking as many as keep its need within ratio x its free memory
    (the last takes the rest); None when they do not all fit that way. A device's need grows with its slots."""
    holders = []
    at = first
    for i, device in enumerate(devices):
        limit = ratio * device.free_bytes
        if i == len(devices) - 1:
            count = costs.slots.n - at
        else:
            lo, hi = 0, costs.slots.n - at
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if costs.holder(device, at, mid, pipeline=pipeline).need <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            count = lo
        holder = costs.holder(device, at, count, pipeline=pipeline)
        if holder.need > limit:
            return None
        holders.append(holder)
        at += count
    return holders if at == costs.slots.n else None


def _balance(costs: _Costs, devices: list[Device], first: int, *, pipeline: bool) -> list[_Holder]:
    """Slots first.. over `devices` so that the largest share of free memory any of them uses is as small as it
    can be: each holds layers in proportion to what fits it. Bisects that share (above 1: nothing fits)."""
    lo, hi = 0.0, 1.0
    while _fill(costs, devices, first, hi, pipeline=pipeline) is None:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("no device has free memory to plan with")
    for _ in range(40):
        mid = (lo + hi) / 2
        if _fill(costs, devices, first, mid, pipeline=pipeline) is None:
            lo = mid
        else:
            hi = mid
    holders = _fill(costs, devices, first, hi, pipeline=pipeline)
    assert holders is not None
    return holders


def _proportional(costs: _Costs, devices: list[Device]) -> list[_Holder]:
    """All slots over `devices` (the CPU first) in proportion to what fits each: the memory it has free once its
    fixed costs (compute buffer, the CPU's embeddings and output buffer, a GPU's reserve) are paid — llama.cpp's
    split by free memory, net of what does not move with the layers. When rounding to whole layers leaves a device
    short while the balanced split (the smallest largest share of free memory) fits, that one is taken."""
    n = costs.slots.n
    last = len(devices) - 1
    capacity = []
    for i, device in enumerate(devices):
        one = costs.holder(device, n - 1 if i == last else 0, 1, pipeline=False)
        capacity.append(max(0, device.free_bytes - one.fixed - one.compute - costs.slots.shared))
    moving = [0, *accumulate(w + kv for w, kv in zip(costs.slots.weights, costs.slots.kv))]
    total_capacity = sum(capacity) or 1
    holders, at, reached = [], 0, 0
    for i, device in enumerate(devices):
        reached += capacity[i]
        if i == last:
            stop = n
        else:
            target = moving[n] * reached / total_capacity
            stop = min(range(at, n + 1), key=lambda j: abs(moving[j] - target))
        holders.append(costs.holder(device, at, stop - at, pipeline=False))
        at = stop
    if holders[0].count == 0 and len([h for h in holders[1:] if h.count]) > 1:
        holders = [costs.holder(h.device, h.first, h.count, pipeline=True) for h in holders]
    if all(h.need <= h.device.free_bytes for h in holders):
        return holders
    balanced = _balance(costs, devices, 0, pipeline=False)
    if all(h.need <= h.device.free_bytes for h in balanced):
        return balanced
    return holders


def _placement(costs: _Costs, cpu: Device, offload: list[Device], workers: bool,
               n_gpu_layers: int | None) -> list[_Holder]:
    """Where llama.cpp's layers go: the CPU holds the first slots, `offload` devices (llama.cpp's device list) the
    rest, the output layer always with the last of them that holds any.

    With RPC workers every device, this machine's CPU included, holds layers in proportion to what fits it.
    Without, the GPUs take as many layers as fit them (the fastest place for them) and the CPU the rest. A forced
    n_gpu_layers fixes the CPU's share; the offloaded layers are then balanced over the devices."""
    n_slots = costs.slots.n
    if not offload:
        return [costs.holder(cpu, 0, n_slots, pipeline=False)]
    pipeline = len(offload) > 1

    def offloaded(ngl: int) -> list[_Holder] | None:
        if ngl == 0:
            return []
        holders = _balance(costs, offload, n_slots - ngl, pipeline=pipeline and ngl == n_slots)
        return holders if all(h.need <= h.device.free_bytes for h in holders) else None

    if n_gpu_layers is not None:
        ngl = max(0, min(n_gpu_layers, n_slots))
        rest = _balance(costs, offload, n_slots - ngl, pipeline=pipeline and ngl == n_slots) if ngl else []
    elif workers:
        return _proportional(costs, [cpu, *offload])
    else:
        lo, hi = 0, n_slots  # the most layers the GPUs can hold (fewer offloaded never need more GPU memory)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if offloaded(mid) is not None:
                lo = mid
            else:
                hi = mid - 1
        rest = offloaded(lo) or []
    all_offloaded = bool(rest) and rest[0].first == 0
    cpu_holder = costs.holder(cpu, 0, n_slots - sum(h.count for h in rest), pipeline=all_offloaded and pipeline)
    return [cpu_holder, *rest]


def estimate_memory(spec: ModelSpec, quant: str, ctx: int, devices: list[Device], *, type_k: str = "f16",
                    type_v: str = "f16", flash_attn: bool = True, n_ubatch: int = 512, n_batch: int = 2048,
                    n_seq: int = 1, n_gpu_layers: int | None = None) -> MemoryEstimate:
    """One estimate: which device holds which layers and their KV cache, and what each then needs.

    `devices` is this machine's (its CPU, its GPUs) and the RPC workers' (Device.host set). n_gpu_layers None lets
    the estimate choose (see _placement); the count includes the output layer, as llama.cpp's -ngl does."""
    shape = model_shape(spec)
    validate_kv(shape, type_k, type_v, flash_attn)
    cpu = next(d for d in devices if not d.is_gpu and not d.host)
    workers = [d for d in devices if d.host]
    offload = [*workers, *(d for d in devices if d.is_gpu and not d.host)]  # llama.cpp puts RPC devices first

    sizes = tensor_bytes(spec, quant)
    weights = sum(sizes.values())
    kv_layers = kv_cache_bytes_per_layer(shape, n_ctx=ctx, n_seq=n_seq, type_k=type_k, type_v=type_v,
                                         flash_attn=flash_attn)
    kv_total = sum(kv_layers)
    # calibrated against llama.cpp's CPU backend; CUDA's graph allocator is not yet measured (noted in the plan)
    compute = compute_buffer_bytes(shape, n_ctx=ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k,
                                   type_v=type_v, device="cpu")
    output = output_buffer_bytes(shape, n_ctx=ctx, n_batch=n_batch, n_seq=n_seq)

    def device_compute(**parts: Any) -> int:
        return compute_buffer_bytes(shape, n_ctx=ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k,
                                    type_v=type_v, device="cpu", **parts)

    costs = _Costs(spec, _slots(spec, sizes, kv_layers), output, device_compute, cpu)
    holders = _placement(costs, cpu, offload, bool(workers), n_gpu_layers)
    cpu_holder, rest = holders[0], holders[1:]
    if cpu_holder.count == costs.slots.n:
        cpu_holder.compute = compute  # the whole graph on the CPU: the calibrated single-device figure
    n_offloaded = costs.slots.n - cpu_holder.count

    by_name = {h.device.name: h for h in holders}
    uses: list[DeviceUse] = []
    binding = []
    for device in [*(d for d in devices if d.is_gpu and not d.host), cpu, *workers]:
        h = by_name.get(device.name) or _Holder(device)
        layers = max(0, min(h.first + h.count, spec.n_layer) - h.first)
        uses.append(DeviceUse(device.name, h.need if (h.count or device is cpu) else 0, device.free_bytes,
                              host=device.host, layers=layers, first_layer=h.first, output_layer=bool(h.count) and
                              h.first + h.count == costs.slots.n, weights_bytes=h.weights + (h.fixed - output
                              if device is cpu else 0), kv_bytes=h.kv, compute_bytes=h.compute))
        need = uses[-1].bytes
        if need > device.free_bytes:
            what = "RAM" if device is cpu else (f"{device.host} ({device.name})" if device.host else device.name)
            binding.append(f"{what} needs {need / GIB:.1f} GiB, {device.free_bytes / GIB:.1f} GiB free")
    notes = []
    if any(d.is_gpu for d in offload) and n_offloaded:
        notes.append("GPU compute buffer estimated with the CPU-calibrated model")
    if len([h for h in holders if h.count]) > 1:
        weights = sum(u.weights_bytes for u in uses)  # as llama.cpp allocates them: shared tensors copied per device
    total_need = sum(u.bytes for u in uses)
    total_free = sum(d.free_bytes for d in [cpu, *offload])
    used = [h for h in rest if h.count]
    return MemoryEstimate(model=spec.name, quant=quant.upper(), ctx=ctx, type_k=type_k, type_v=type_v,
                          flash_attn=flash_attn, n_ubatch=n_ubatch, n_seq=n_seq, n_gpu_layers=n_offloaded,
                          weights_bytes=weights, kv_bytes=kv_total,
                          compute_bytes=sum(u.compute_bytes for u in uses), output_bytes=output,
                          total_bytes=weights + kv_total + sum(u.compute_bytes for u in uses) + output,
                          devices=uses, fits=not binding, binding="; ".join(binding), notes=notes,
                          offload=[h.device.name for h in used], tensor_split=[h.count for h in used],
                          shortfall_bytes=max(0, total_need - total_free))


def largest_fitting_ctx(spec: ModelSpec, quant: str, devices: list[Device], *, max_ctx: int, **options: Any) -> int:
    """The largest multiple of 256 (≤ max_ctx) whose estimate fits, 0 if none does. Memory grows with ctx: bisect."""
    lo, hi = 0, max_ctx // CTX_STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_memory(spec, quant, mid * CTX_STEP, devices, **options).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * CTX_STEP


def estimate_grid(spec: ModelSpec, quants: Sequence[str], contexts: Sequence[int], kv_pairs: Sequence[tuple[str, str]],
                  devices: list[Device], *, max_ctx: int,
                  **options: Any) -> tuple[list[MemoryEstimate], dict[tuple[str, str], int]]:
    """Estimates for every quant × KV type × context, and per quant and KV type the largest context that fits."""
    estimates: list[MemoryEstimate] = []
    largest: dict[tuple[str, str], int] = {}
    for quant in quants:
        for type_k, type_v in kv_pairs:
            kv_options = dict(options, type_k=type_k, type_v=type_v)
            estimates += [estimate_memory(spec, quant, ctx, devices, **kv_options) for ctx in contexts]
            kv = kv_type_name(type_k, type_v)
            largest[(quant.upper(), kv)] = largest_fitting_ctx(spec, quant, devices, max_ctx=max_ctx, **kv_options)
    return estimates, largest


def context_ladder(max_ctx: int) -> list[int]:
    """4K, 8K, 16K, … up to and including the model's maximum."""
    ladder, ctx = [], 4096
    while ctx < max_ctx:
        ladder.append(ctx)
        ctx *= 2
    return [*ladder, max_ctx]
