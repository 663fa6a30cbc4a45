"""From what the user typed to an engine configuration — shared by `chat`, `niah` and `bench`: find the GGUF (a path,
a split set, `demo`, or a file in a Hub GGUF repo), plan it on this machine with the user's overrides (refusing, before
anything is loaded, a plan that cannot fit), and build the EngineConfig."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .devices import Device, machine_devices, worker_devices
from .engine.protocol import EngineConfig
from .errors import LcrunError
from .gguf_split import GGUFSet, read_gguf_set
from .model_spec import ModelSpec, spec_from_gguf
from .planner import Choice, choose


@dataclass(frozen=True)
class RunOverrides:
    """What the user forced; None means "the planner decides"."""
    ctx: int | None = None
    kv_type: str | None = None          # "q8_0", or "q8_0/q4_0" for K and V apart
    flash_attn: str = "auto"            # "on", "off", "auto"
    gpu_layers: int | None = None
    threads: int | None = None
    rope_theta: float | None = None
    rope_scale: float | None = None
    ubatch: int = 512
    gpu_mem: tuple[int, ...] | None = None
    ram: int | None = None
    rpc: tuple[str, ...] = ()                   # RPC workers (HOST:PORT) to spread the layers over
    rpc_mem: tuple[tuple[str, int], ...] = ()   # a worker's free memory, given instead of asked
    repack: bool | None = None                  # llama.cpp's weight repacking (EngineConfig.repack)


@dataclass
class Launch:
    model_path: Path
    spec: ModelSpec
    choice: Choice
    config: EngineConfig
    devices: list[Device]
    warnings: list[str] = field(default_factory=list)
    gguf: GGUFSet | None = None   # the file's headers, read once: metadata, vocabulary lookups, chat template
    overrides: RunOverrides = field(default_factory=RunOverrides)
    n_seq: int = 1


def demo_gguf() -> Path:
    """The built-in demo checkpoint converted once (F16) into the user cache: a model that needs no download."""
    import platformdirs

    from lcrun.convert.convert import convert_checkpoint
    from lcrun.models import demo_checkpoint

    from . import __version__

    path = Path(platformdirs.user_cache_dir("lcrun")) / f"demo-{__version__}-F16.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        convert_checkpoint(demo_checkpoint(), path, outtype="f16")
    return path


def find_model_file(model: str, *, hub_file: str | None = None, revision: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """A GGUF path, `demo`, or a Hub GGUF repo as llama.cpp's -hf takes it: `org/repo:QUANT` (that quant's file or
    split set), `org/repo` (its only GGUF). The file is downloaded into the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_file():
        if hub_file:
            raise LcrunError(model, "--file names a file in a Hub repo; MODEL is already a local file")
        return path
    if model == "demo":
        return demo_gguf()
    if path.is_dir():
        raise LcrunError(model, "a folder, not a GGUF file (convert a checkpoint first: lcrun convert "
                                f"{model} --outtype q8_0)")
    from . import hub

    repo_id, quant = hub.split_model_ref(model)
    if not hub.looks_like_repo_id(repo_id):
        raise LcrunError(model, "no such file (give a .gguf path, `demo`, or a Hub GGUF repo as org/repo:QUANT)")
    if quant and hub_file:
        raise LcrunError(model, f"both :{quant} and --file {hub_file} say which GGUF to run; give one")
    filename = hub_file or hub.choose_gguf(repo_id, hub.list_gguf_files(repo_id, revision), quant)
    return hub.download_gguf(repo_id, filename, revision, progress=progress)


def default_threads() -> int:
    """One thread per physical core, as llama.cpp's own tools default to (llama-cpp-python would take half the
    logical CPUs, which on a small machine leaves cores idle while generating)."""
    import os

    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable))


def decide_launch(model_path: Path, overrides: RunOverrides = RunOverrides(), *,
                devices: list[Device] | None = None, n_seq: int = 1, files: GGUFSet | None = None) -> Launch:
    """The planner's choices for `model_path` with the user's overrides, and the EngineConfig that carries them out.
    `files`: the GGUF's headers when already read."""
    files = files or read_gguf_set(model_path)
    spec = spec_from_gguf(model_path, files)
    if devices is None:
        devices = machine_devices(list(overrides.gpu_mem) if overrides.gpu_mem is not None else None, overrides.ram)
        if overrides.rpc or overrides.rpc_mem:
            not_running = [host for host, _ in overrides.rpc_mem if host not in overrides.rpc]
            if not_running:
                raise LcrunError(not_running[0], "--rpc-mem gives the memory of a worker this run uses: name it "
                                                 "with --rpc too (to plan for workers not running yet, use "
                                                 "`lcrun estimate` or `lcrun plan`)")
            devices = [*devices, *worker_devices(overrides.rpc, dict(overrides.rpc_mem))]
    choice = choose(spec, spec.file_type or "file", devices, ctx=overrides.ctx, kv_type=overrides.kv_type,
                    flash_attn=overrides.flash_attn, n_gpu_layers=overrides.gpu_layers, n_ubatch=overrides.ubatch,
                    n_seq=n_seq)
    plan = choice.estimate
    warnings = []
    if overrides.rope_theta is not None:
        was = f"{spec.rope_theta:g}" if spec.rope_theta else "unset"
        warnings.append(f"--rope-theta {overrides.rope_theta:g} overrides the file's RoPE base ({was}); "
                        "the model computes different numbers than it was trained with")
    if overrides.rope_scale is not None:
        warnings.append(f"--rope-scale {overrides.rope_scale:g} overrides the file's RoPE scaling "
                        f"({spec.rope_scaling or 'none'}); positions are compressed by that factor")
    if plan.ctx > spec.n_ctx_train:
        warnings.append(f"context {plan.ctx:,} is above the {spec.n_ctx_train:,} tokens the model declares")
    config = EngineConfig(
        model_path=model_path, n_ctx=plan.ctx, n_gpu_layers=plan.n_gpu_layers, type_k=plan.type_k,
        type_v=plan.type_v, flash_attn=plan.flash_attn, n_threads=overrides.threads or default_threads(),
        n_batch=max(plan.n_ubatch, 2048), n_ubatch=plan.n_ubatch, n_seq=n_seq,
        rope_freq_base=overrides.rope_theta, rope_freq_scale=(1.0 / overrides.rope_scale
                                                              if overrides.rope_scale else None),
        # with RPC workers the plan's placement is passed whole (llama.cpp would split by free memory otherwise)
        devices=tuple(plan.offload) if any(d.host for d in devices) else None,
        tensor_split=tuple(plan.tensor_split) if any(d.host for d in devices) else None,
        repack=overrides.repack,
    )
    return Launch(model_path, spec, choice, config, devices, warnings, files, overrides, n_seq)


def no_larger_than_needed(launch: Launch, needed_ctx: int) -> Launch:
    """Without --ctx the planner takes the largest context that fits; a run that needs only `needed_ctx` tokens (a
    niah grid, a bench ladder) gets the smallest multiple of 256 that holds them: less memory allocated, and
    perhaps a less lossy KV type. A context the user forced is kept."""
    from dataclasses import replace

    wanted = -(-needed_ctx // 256) * 256
    if launch.overrides.ctx is not None or launch.choice.estimate.ctx <= wanted:
        return launch
    return decide_launch(launch.model_path, replace(launch.overrides, ctx=wanted), devices=launch.devices,
                       n_seq=launch.n_seq, files=launch.gguf)
