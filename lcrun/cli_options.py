"""Options shared by the commands that load a model (`chat`, `niah`, `bench`): the planner's choices, each of which
the user can force. Only click is imported here, so `lcrun --help` stays instant."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

_RUN_OPTIONS = [
    click.option("--file", "hub_file", metavar="NAME.gguf", help="When MODEL is a Hub repo id: the GGUF file in it "
                 "(downloaded into the Hugging Face cache, with a progress bar)."),
    click.option("--revision", help="Hub revision (branch, tag or commit)."),
    click.option("--ctx", metavar="N", help="Context length (32k, 128k, 1M, …); default: the largest that fits (chat) or what the run needs "
                 "(niah, bench)."),
    click.option("--kv-type", metavar="K[/V]", help="KV cache type: f16, q8_0, q4_0, or K/V apart (q8_0/q4_0); "
                 "default: the least lossy that reaches the context."),
    click.option("--flash-attn", type=click.Choice(["on", "off", "auto"]), default="auto", show_default=True),
    click.option("--gpu-layers", type=int, help="Layers to offload to the GPU (default: as many as fit)."),
    click.option("--threads", type=int, help="CPU threads (default: one per physical core)."),
    click.option("--rope-theta", type=float, help="Override the file's RoPE base (warns: the model changes)."),
    click.option("--rope-scale", type=float, help="Override the file's RoPE scaling: stretch positions by this factor."),
    click.option("--gpu-mem", "gpu_mem", multiple=True, metavar="SIZE", help="Plan for GPU(s) of this free memory "
                 "instead of detecting (e.g. 24G; repeatable)."),
    click.option("--ram", metavar="SIZE", help="Plan for this much free RAM instead of detecting."),
]


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the model-loading options; the command receives them as keyword arguments (see `overrides_from`)."""
    for option in reversed(_RUN_OPTIONS):
        func = option(func)
    return func


RUN_OPTION_NAMES = ("hub_file", "revision", "ctx", "kv_type", "flash_attn", "gpu_layers", "threads", "rope_theta",
                    "rope_scale", "gpu_mem", "ram")


def overrides_from(options: dict[str, Any]) -> Any:
    """RunOverrides from the parsed options (a dict holding at least RUN_OPTION_NAMES)."""
    from .param_types import parse_ctx, parse_memory
    from .launch import RunOverrides

    kv = options.get("kv_type")
    return RunOverrides(
        ctx=parse_ctx(options["ctx"]) if options.get("ctx") else None,
        kv_type=kv.lower() if kv and kv.lower() != "auto" else None,
        flash_attn=options.get("flash_attn") or "auto",
        gpu_layers=options.get("gpu_layers"),
        threads=options.get("threads"),
        rope_theta=options.get("rope_theta"),
        rope_scale=options.get("rope_scale"),
        gpu_mem=tuple(parse_memory(g) for g in options["gpu_mem"]) if options.get("gpu_mem") else None,
        ram=parse_memory(options["ram"]) if options.get("ram") else None,
    )


def run_options_without_file(func: Callable[..., Any]) -> Callable[..., Any]:
    """The model-loading options except --file (for `chat`, where --file also adds documents)."""
    for option in reversed(_RUN_OPTIONS[1:]):
        func = option(func)
    return func
