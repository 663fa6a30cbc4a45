"""The memory this machine has free: CPU RAM (psutil) and NVIDIA GPUs (NVML, when a driver is present) — and the
devices of RPC workers elsewhere (`lcrun worker`), asked over RPC.

`--gpu-mem` / `--ram` replace detection, to plan for a machine you don't have; `--rpc-mem HOST=SIZE` plans for a
worker that is not running yet."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Device:
    name: str            # "CPU" or "CUDA0", "CUDA1", … (llama.cpp's names)
    total_bytes: int
    free_bytes: int
    is_gpu: bool
    detected: bool = True
    host: str = ""       # "" this machine; else the worker's HOST:PORT (its devices are named "RPC0[HOST:PORT]", …)


def default_threads() -> int:
    """One thread per physical core, as llama.cpp's own tools default to (llama-cpp-python would take half the
    logical CPUs, which on a small machine leaves cores idle while generating)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable))


def cpu_device(ram_bytes: int | None = None) -> Device:
    if ram_bytes is not None:
        return Device("CPU", ram_bytes, ram_bytes, is_gpu=False, detected=False)
    memory = psutil.virtual_memory()
    return Device("CPU", memory.total, memory.available, is_gpu=False)


def nvidia_devices() -> list[Device]:
    """GPUs NVML reports, [] without an NVIDIA driver (or without nvidia-ml-py)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            found.append(Device(f"CUDA{index}", int(info.total), int(info.free), is_gpu=True))
        return found
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def machine_devices(gpu_mem: list[int] | None = None, ram: int | None = None) -> list[Device]:
    """GPUs first (as llama.cpp orders them), then the CPU."""
    gpus = ([Device(f"CUDA{i}", b, b, is_gpu=True, detected=False) for i, b in enumerate(gpu_mem)]
            if gpu_mem is not None else nvidia_devices())
    return [*gpus, cpu_device(ram)]


def worker_devices(endpoints: Sequence[str], memory: dict[str, int] | None = None) -> list[Device]:
    """The devices of RPC workers, in the order given: for each running worker (`endpoints`, HOST:PORT) its devices
    and their free memory asked over RPC — after a handshake, so that an unreachable worker, a busy one or one of
    another protocol version is one line naming it; for a worker in `memory` (`--rpc-mem HOST=SIZE`), one device of
    that size instead, asked nothing (it need not be running)."""
    from .engine import rpc

    memory = dict(memory or {})
    found: list[Device] = []
    if endpoints:
        rpc.require_rpc("--rpc")
    for endpoint in endpoints:
        rpc.probe(endpoint)  # given memory or not, a worker named with --rpc will be used: it must answer
        if endpoint in memory:
            continue
        for dev in rpc.worker_memory(endpoint):
            found.append(Device(dev.name, dev.total_bytes, dev.free_bytes, is_gpu=False, host=endpoint))
    for endpoint in [*[e for e in endpoints if e in memory], *[e for e in memory if e not in endpoints]]:
        size = memory[endpoint]
        found.append(Device(rpc.device_name(endpoint, 0), size, size, is_gpu=False, detected=False, host=endpoint))
    order = {e: i for i, e in enumerate([*endpoints, *[e for e in memory if e not in endpoints]])}
    return sorted(found, key=lambda d: order[d.host])


def run_devices(gpu_mem: Sequence[int] | None = None, ram: int | None = None, rpc: Sequence[str] = (),
                rpc_mem: Mapping[str, int] | None = None) -> list[Device]:
    """What a run is planned on: this machine's devices (or what --gpu-mem/--ram say), then the RPC workers' (asked
    over RPC, or what --rpc-mem says). ggml's RPC client is imported only when there are workers."""
    devices = machine_devices(list(gpu_mem) if gpu_mem else None, ram)
    if rpc or rpc_mem:
        devices += worker_devices(rpc, dict(rpc_mem or {}))
    return devices
