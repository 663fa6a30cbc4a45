"""Options shared by the commands that load a model (`chat`, `niah`, `bench`): the planner's choices, each of which
the user can force, and the chat format (`chat`, `niah`). Only click is imported here, so `lcrun --help` stays
instant."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .param_types import CONTEXT, MEMORY, RPC_ENDPOINTS, RPC_MEMORY, kv_type_from, worker_memory_map

# Each option is declared once; the lists below pick them for each kind of command. lcrun's names come first,
# llama.cpp's (and llama-server's) spellings beside them as aliases of the same option.
_HUB_FILE_HELP = "When MODEL is a Hub repo and its :QUANT does not pick one file: the GGUF in it (llama.cpp's -hff)."
HUB_FILE = click.option("--hf-file", "--file", "hub_file", metavar="NAME.gguf", help=_HUB_FILE_HELP)
# chat, where --file adds a document
HUB_FILE_ONLY = click.option("--hf-file", "hub_file", metavar="NAME.gguf", help=_HUB_FILE_HELP)
REVISION = click.option("--revision", help="Hub revision (branch, tag or commit).")
CACHE_TYPE_K = click.option("-ctk", "--cache-type-k", metavar="TYPE",
                            help="llama.cpp's way: the K cache type (V stays f16 unless -ctv).")
CACHE_TYPE_V = click.option("-ctv", "--cache-type-v", metavar="TYPE", help="llama.cpp's way: the V cache type.")
FLASH_ATTN = click.option("-fa", "--flash-attn", type=click.Choice(["on", "off", "auto"]), default="auto",
                          show_default=True)
GPU_LAYERS = click.option("-ngl", "--gpu-layers", "--n-gpu-layers", "gpu_layers", type=int,
                          help="Layers to offload to the GPU (default: as many as fit).")
UBATCH = click.option("-ub", "--ubatch", "--ubatch-size", "ubatch", type=int, default=512, show_default=True,
                      help="Physical batch size (n_ubatch).")
GPU_MEM = click.option("--gpu-mem", "gpu_mem", type=MEMORY, multiple=True, metavar="SIZE",
                       help="Plan for GPU(s) of this free memory instead of detecting (e.g. 24G; repeatable).")
RAM = click.option("--ram", type=MEMORY, metavar="SIZE", help="Plan for this much free RAM instead of detecting.")
RPC = click.option("--rpc", "rpc", type=RPC_ENDPOINTS, metavar="HOST:PORT,…",
                   help="Spread the layers over this machine and these RPC workers (`lcrun worker` on each), in "
                        "proportion to the memory each has free (asked over RPC).")
RPC_MEM = click.option("--rpc-mem", "rpc_mem", type=RPC_MEMORY, multiple=True, metavar="HOST=SIZE",
                       help="Plan with SIZE free on a worker instead of asking it (estimate and plan: it need not be "
                            "running yet; repeatable).")
PARALLEL = click.option("-np", "--parallel", type=click.IntRange(1, 256), default=1, show_default=True,
                        help="Parallel sequences (n_seq; a server's slots): requests generated at the same time, "
                             "sharing the context (--ctx is the total; each gets an equal part).")

_RUN_OPTIONS = [
    REVISION,
    click.option("-c", "--ctx", "--ctx-size", "ctx", type=CONTEXT, metavar="N",
                 help="Context length (32k, 128k, 1M, …); default: the largest that fits (chat) or what the run "
                      "needs (niah, bench)."),
    click.option("--kv-type", metavar="K[/V]", help="KV cache type: f16, q8_0, q4_0, or K/V apart (q8_0/q4_0); "
                 "default: the least lossy that reaches the context."),
    CACHE_TYPE_K,
    CACHE_TYPE_V,
    FLASH_ATTN,
    GPU_LAYERS,
    click.option("-t", "--threads", type=int, help="CPU threads (default: one per physical core)."),
    UBATCH,
    click.option("--rope-theta", "--rope-freq-base", "rope_theta", type=float,
                 help="Override the file's RoPE base (warns: the model changes)."),
    click.option("--rope-scale", type=float, help="Override the file's RoPE scaling: stretch positions by this factor."),
    click.option("--rope-freq-scale", type=float, help="llama.cpp's way: the RoPE frequency scale, 1/--rope-scale."),
    GPU_MEM,
    RAM,
    RPC,
    RPC_MEM,
    click.option("--repack/--no-repack", " /-nr", "repack", default=None,
                 help="llama.cpp's weight repacking for faster CPU kernels. Default: on, except where llama.cpp "
                      "would use AMX, whose matrix multiplication crashes (llama.cpp issue 20824)."),
]
# estimate and plan: how the machine (and its workers) is described; they take their own --ctx/--kv-type/--quant
_MACHINE_OPTIONS = [CACHE_TYPE_K, CACHE_TYPE_V, FLASH_ATTN, UBATCH, PARALLEL, GPU_LAYERS, GPU_MEM, RAM, RPC, RPC_MEM,
                    HUB_FILE, REVISION]


def _apply(options: list[Callable[..., Any]], func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        func = option(func)
    return func


def machine_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that describe the machine and its workers (`estimate`, `plan`)."""
    return _apply(_MACHINE_OPTIONS, func)


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the model-loading options; the command receives them as keyword arguments (see `overrides_from`)."""
    return _apply([HUB_FILE, *_RUN_OPTIONS], func)


def overrides_from(options: dict[str, Any]) -> Any:
    """RunOverrides from the parsed options."""
    from .launch import RunOverrides

    kv = options.get("kv_type")
    kv = kv_type_from(kv.lower() if kv and kv.lower() != "auto" else None, options.get("cache_type_k"),
                      options.get("cache_type_v"))
    rope_scale = options.get("rope_scale")
    if options.get("rope_freq_scale") is not None:
        if rope_scale is not None:
            raise click.UsageError("give the RoPE scaling once: --rope-scale, or --rope-freq-scale (its inverse)")
        if options["rope_freq_scale"] <= 0:
            raise click.BadParameter("must be above 0", param_hint="--rope-freq-scale")
        rope_scale = 1.0 / options["rope_freq_scale"]
    return RunOverrides(
        ctx=options.get("ctx"),
        kv_type=kv,
        flash_attn=options.get("flash_attn") or "auto",
        gpu_layers=options.get("gpu_layers"),
        threads=options.get("threads"),
        rope_theta=options.get("rope_theta"),
        rope_scale=rope_scale,
        ubatch=options.get("ubatch") or 512,
        gpu_mem=tuple(options["gpu_mem"]) if options.get("gpu_mem") else None,
        ram=options.get("ram"),
        rpc=tuple(options.get("rpc") or ()),
        rpc_mem=tuple(worker_memory_map(options.get("rpc_mem")).items()),
        repack=options.get("repack"),
    )


def run_options_without_file(func: Callable[..., Any]) -> Callable[..., Any]:
    """The model-loading options without --file (`chat`, where --file adds documents): --hf-file names a Hub file."""
    return _apply([HUB_FILE_ONLY, *_RUN_OPTIONS], func)


class ChatTemplateType(click.ParamType):
    """`--chat-template NAME|FILE`: one of llama.cpp's built-in formats, a Jinja template file, or a Jinja template
    inline (as llama.cpp takes it) — a lcrun.chat.formats.FormatChoice. `list` passes through (see _list_formats)."""
    name = "NAME|FILE"

    def __init__(self, *, file_only: bool = False) -> None:
        self.file_only = file_only

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str) or (value == "list" and not self.file_only):
            return value
        from .chat.formats import requested_format
        from .chat.template import TemplateError

        try:
            return requested_format(value, file_only=self.file_only)
        except TemplateError as exc:
            self.fail(str(exc), param, ctx)


def _list_formats(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    if value == "list":
        from .engine.chat_format import builtin_formats

        click.echo("\n".join(builtin_formats()))
        ctx.exit(0)
    return value


CHAT_TEMPLATE_OPTIONS = [
    click.option("--chat-template", "chat_template", type=ChatTemplateType(), is_eager=True, callback=_list_formats,
                 help="The chat format: one of llama.cpp's built-in names (chatml, llama3, gemma, mistral-v7, "
                      "phi3, …; `--chat-template list` prints them all) or a Jinja template FILE. Default: the "
                      "file's own template; without one, the format its special tokens belong to, else ChatML."),
    click.option("--chat-template-file", "chat_template_file", type=ChatTemplateType(file_only=True),
                 metavar="FILE", help="A Jinja chat template file (llama.cpp's spelling; as --chat-template FILE)."),
]
RAW_OPTION = click.option("--raw", is_flag=True, help="No chat format: the prompt is continued as plain text "
                                                      "(for base models).")


def chat_template_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--chat-template and --chat-template-file (for a command that always chats, such as a server)."""
    return _apply(CHAT_TEMPLATE_OPTIONS, func)


def chat_format_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--chat-template, --chat-template-file and --raw; the command receives them as keyword arguments (see
    `chat_format_from`)."""
    return chat_template_options(RAW_OPTION(func))


def chat_format_from(options: dict[str, Any]) -> Any:
    """The FormatChoice the user asked for (None: the model's own), from the parsed options."""
    from .chat.formats import RAW

    given = [(flag, options.get(key)) for flag, key in (("--chat-template", "chat_template"),
                                                        ("--chat-template-file", "chat_template_file"))]
    chosen = [(flag, value) for flag, value in given if value is not None]
    if options.get("raw"):
        chosen.append(("--raw", RAW))
    if len(chosen) > 1:
        raise click.UsageError(f"{chosen[0][0]} and {chosen[1][0]} exclude each other: give one chat format")
    return chosen[0][1] if chosen else None
