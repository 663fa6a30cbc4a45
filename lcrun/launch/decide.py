"""Everything decided before a model loads, from the options alone: the GGUF (downloaded if it comes from the Hub),
its headers read once, the planner's choice on this machine (refusing, before anything is loaded, a plan that cannot
fit), the chat format, the warnings, and the EngineConfig that carries them out. No engine is imported here, so a
`--dry-run` stays fast; `lcrun.launch.loaded.open_model` loads what this decides."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lcrun.devices import Device, default_threads, run_devices
from lcrun.engine.protocol import EngineConfig
from lcrun.errors import LcrunError
from lcrun.gguf_split import GGUFSet, read_gguf_set
from lcrun.kv_types import KvType
from lcrun.model_spec import ModelSpec, spec_from_gguf
from lcrun.planner import Choice, choose

from .model_file import find_model_file
from .options import LaunchOptions
from .recall import Machine, effective_context, plan_advice

if TYPE_CHECKING:
    from lcrun.chat.formats import FormatChoice
    from lcrun.recall_advice import RecallAdvice


@dataclass
class Launch:
    """What was decided for a run, before loading: what `lcrun chat --dry-run` and the plan panel show."""
    options: LaunchOptions
    model_path: Path
    spec: ModelSpec
    choice: Choice
    config: EngineConfig
    devices: list[Device]
    gguf: GGUFSet                              # the file's headers, read once: metadata, vocabulary, chat template
    chat_format: FormatChoice | None = None    # None: the run does not chat (bench)
    warnings: list[str] = field(default_factory=list)
    recall: RecallAdvice | None = None         # the file's measured recall for the plan (None: never measured)


def decide_launch(options: LaunchOptions, *, model_path: Path | None = None,
                  download: Callable[[int, int], None] | None = None) -> Launch:
    """The launch of `options`: the model file found (`download(done, total)` gets the bytes of a Hub download;
    `model_path` skips the search), planned on this machine and its RPC workers."""
    if model_path is None:
        model_path = find_model_file(options.model, hub_file=options.hub_file, revision=options.revision,
                                     progress=download)
    not_running = [host for host, _ in options.rpc_mem if host not in options.rpc]
    if not_running:
        raise LcrunError(not_running[0], "--rpc-mem gives the memory of a worker this run uses: name it with --rpc "
                                         "too (to plan for workers not running yet, use `lcrun estimate` or "
                                         "`lcrun plan`)")
    devices = run_devices(options.gpu_mem, options.ram, options.rpc, dict(options.rpc_mem))
    return _decide(options, model_path, read_gguf_set(model_path), devices)


def no_larger_than_needed(launch: Launch, needed_ctx: int) -> Launch:
    """Without --ctx the planner takes the largest context that fits; a run that needs only `needed_ctx` tokens (a
    niah grid, a bench ladder) gets the smallest multiple of 256 that holds them: less memory allocated, and
    perhaps a less lossy KV type. A context the user forced is kept."""
    wanted = -(-needed_ctx // 256) * 256
    if launch.options.ctx is not None or launch.choice.estimate.ctx <= wanted:
        return launch
    return _decide(replace(launch.options, ctx=wanted), launch.model_path, launch.gguf, launch.devices)


def redecide(launch: Launch, **changes: object) -> Launch:
    """The launch again with some options changed (niah's suite: each KV type at its longest length), the file's
    headers and the devices as they were read."""
    return _decide(replace(launch.options, **changes), launch.model_path, launch.gguf, launch.devices)


def _decide(options: LaunchOptions, model_path: Path, files: GGUFSet, devices: list[Device]) -> Launch:
    spec = spec_from_gguf(model_path, files)
    machine = Machine(spec, spec.file_type or "file", devices, flash_attn=options.flash_attn != "off",
                      n_ubatch=options.ubatch, n_seq=options.n_seq, n_gpu_layers=options.gpu_layers)
    effective_why = ""
    if options.effective_ctx:   # --ctx effective: the longest context measured good that fits
        ctx, kv, effective_why = effective_context(model_path, machine, options.kv_type)
        options = replace(options, ctx=ctx, kv_type=kv.label, effective_ctx=False)
    choice = choose(spec, spec.file_type or "file", devices, ctx=options.ctx, kv_type=options.kv_type,
                    flash_attn=options.flash_attn, n_gpu_layers=options.gpu_layers, n_ubatch=options.ubatch,
                    n_seq=options.n_seq)
    if effective_why:
        choice = Choice(choice.estimate, f"{effective_why}; {choice.why}")
    estimate = choice.estimate
    spread = any(d.host for d in devices)
    config = EngineConfig(
        model_path=model_path, n_ctx=estimate.ctx, n_gpu_layers=estimate.n_gpu_layers, type_k=estimate.type_k,
        type_v=estimate.type_v, flash_attn=estimate.flash_attn, n_threads=options.threads or default_threads(),
        n_threads_batch=options.threads_batch, n_batch=max(estimate.n_ubatch, 2048), n_ubatch=estimate.n_ubatch,
        n_seq=options.n_seq, rope_freq_base=options.rope_theta,
        rope_freq_scale=1.0 / options.rope_scale if options.rope_scale else None,
        # with RPC workers the estimate's placement is passed whole (llama.cpp would split by free memory otherwise)
        devices=tuple(estimate.offload) if spread else None,
        tensor_split=tuple(estimate.tensor_split) if spread else None,
        repack=options.repack,
    )
    chat_format = None
    if options.chat:  # decided from the header, before loading: the plan panel and --dry-run say which
        from lcrun.chat.formats import choose_format, header_vocabulary

        chat_format = choose_format(header_vocabulary(files.meta), options.chat_format)
    warnings = _warnings(options, spec, estimate.ctx)
    recall, problem = plan_advice(model_path, machine, estimate.ctx, KvType(estimate.type_k, estimate.type_v))
    warnings += [problem] if problem else []
    return Launch(options, model_path, spec, choice, config, devices, files, chat_format, warnings, recall)


def _warnings(options: LaunchOptions, spec: ModelSpec, ctx: int) -> list[str]:
    warnings = []
    if options.rope_theta is not None:
        was = f"{spec.rope_theta:g}" if spec.rope_theta else "unset"
        warnings.append(f"--rope-theta {options.rope_theta:g} overrides the file's RoPE base ({was}); "
                        "the model computes different numbers than it was trained with")
    if options.rope_scale is not None:
        warnings.append(f"--rope-scale {options.rope_scale:g} overrides the file's RoPE scaling "
                        f"({spec.rope_scaling or 'none'}); positions are compressed by that factor")
    if ctx > spec.n_ctx_train:
        warnings.append(f"context {ctx:,} is above the {spec.n_ctx_train:,} tokens the model declares")
    return warnings
