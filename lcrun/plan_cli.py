"""`lcrun plan`: the planner's choice for MODEL on this machine (and RPC workers), why, llama.cpp's own figures with
--verify, and for a local GGUF the recall measured on it (lcrun niah --suite ruler): the effective context for the
chosen KV type beside the planned context, or the one-line warning when the plan goes beyond it. `--ctx effective`
plans the longest context measured good that fits."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_options import KV_TYPE_OPTION, context_option, machine_options
from .param_types import EFFECTIVE, kv_type_from, worker_memory_map


@click.command(epilog="""\b
Examples:
  lcrun plan Llama-3.1-8B-Instruct-Q4_K_M.gguf                 # the largest context that fits, KV type chosen
  lcrun plan model.gguf --ctx 128k --gpu-mem 24G               # refused before loading if it cannot fit
  lcrun plan model.gguf --ctx 8k --verify                      # check the estimate with llama.cpp's dry run
  lcrun plan llama-3.1-70b --quant Q4_K_M --kv-type q8_0
  lcrun plan model.gguf --ctx effective                        # the longest context measured good that fits
""")
@click.argument("model")
@click.option("--quant", default="Q4_K_M", show_default=True, help="Quant type, when MODEL is not a GGUF file.")
@context_option("Context length (32k, 128k, …), auto: the largest that fits, or effective: the longest measured "
                "good (lcrun niah FILE --suite ruler) that fits.", default="auto", effective=True)
@KV_TYPE_OPTION
@machine_options
@click.option("--verify", is_flag=True, help="Run llama.cpp's allocation dry run (no_alloc) on the GGUF and compare.")
@click.option("--json", "as_json", is_flag=True)
def plan(model: str, quant: str, ctx: int | str | None, kv_type: str | None, cache_type_k: str | None,
         cache_type_v: str | None, flash_attn: str, gpu_layers: int | None, ubatch: int, parallel: int,
         gpu_mem: tuple[int, ...], ram: int | None, rpc: list[str] | None, rpc_mem: tuple[tuple[str, int], ...],
         hub_file: str | None, revision: str | None, verify: bool, as_json: bool) -> None:
    """Choose context, KV type, flash attention and GPU layers for MODEL on this machine (and RPC workers), and
    explain the choice."""
    from .devices import run_devices
    from .errors import LcrunError
    from .kv_types import KvType
    from .launch.recall import Machine, effective_context, plan_advice
    from .model_spec import resolve_model
    from .planner import choose
    from .recall_report import advice_json, published_for

    spec = resolve_model(model, revision=revision, gguf_file=hub_file)
    devices = run_devices(gpu_mem, ram, rpc or (), worker_memory_map(rpc_mem))
    quant_name = (spec.file_type or quant) if spec.file_tensor_bytes is not None else quant
    kv = kv_type_from(kv_type, cache_type_k, cache_type_v)
    local = Path(model).expanduser() if spec.source == "gguf" and Path(model).expanduser().is_file() else None
    machine = Machine(spec, quant_name, devices, flash_attn=flash_attn != "off", n_ubatch=ubatch, n_seq=parallel,
                      n_gpu_layers=gpu_layers)
    effective_why = ""
    if ctx == EFFECTIVE:
        if local is None:
            raise LcrunError(model, "--ctx effective needs a local GGUF file (its measured recall is stored by the "
                                    "file's fingerprint)")
        ctx, chosen_kv, effective_why = effective_context(local, machine, kv)
        kv = chosen_kv.label
    choice = choose(spec, quant_name, devices, ctx=ctx, kv_type=kv, flash_attn=flash_attn, n_gpu_layers=gpu_layers,
                    n_ubatch=ubatch, n_seq=parallel)
    why = f"{effective_why}; {choice.why}" if effective_why else choice.why
    result = {**choice.estimate.to_dict(), "why": why}
    p = choice.estimate
    advice, problem = plan_advice(local, machine, p.ctx, KvType(p.type_k, p.type_v)) if local else (None, None)
    result["recall"] = advice_json(advice) if advice else None
    result["published_recall"] = published_for(model)
    if problem:
        result.setdefault("notes", []).append(problem)
    if verify:
        if spec.source != "gguf":
            raise LcrunError(model, "--verify needs a local GGUF file (llama.cpp's dry run reads its header)")
        from .engine.allocations import measure_allocations_isolated

        not_running = [d.host for d in devices if d.host and d.host not in (rpc or [])]
        if not_running:
            raise LcrunError(not_running[0], "--verify loads the model on the workers: they must be running "
                                             "(give them with --rpc, not --rpc-mem)")
        measured = measure_allocations_isolated(model, n_ctx=p.ctx, n_ubatch=p.n_ubatch, n_batch=max(p.n_ubatch, 2048),
                                       type_k=p.type_k, type_v=p.type_v, flash_attn=p.flash_attn, n_seq=p.n_seq,
                                       n_gpu_layers=p.n_gpu_layers, devices=tuple(p.offload) if rpc else None,
                                       tensor_split=tuple(p.tensor_split) if rpc else None)
        result["llama_cpp"] = {"weights_bytes": measured.weights_bytes, "kv_bytes": measured.kv_bytes,
                               "compute_bytes": measured.compute_bytes, "output_bytes": measured.output_bytes,
                               "exact": measured.exact, "devices": measured.per_device()}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from .ui.console import make_console
    from .ui.plan_view import render_plan
    from .ui.ruler_view import render_recall_advice

    console = make_console()
    render_plan(spec.name, result, console)
    if advice is not None:
        render_recall_advice(advice, console)
