"""The memory this machine has free: CPU RAM (psutil) and NVIDIA GPUs (NVML, when a driver is present).

`--gpu-mem` / `--ram` replace detection, to plan for a machine you don't have."""
from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Device:
    name: str            # "CPU" or "CUDA0", "CUDA1", … (llama.cpp's names)
    total_bytes: int
    free_bytes: int
    is_gpu: bool
    detected: bool = True


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
