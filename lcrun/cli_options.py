"""The command line's options, each declared once: those of the commands that load a model (`chat`, `serve`,
`niah`, `bench`: the planner's choices, each of which the user can force, and the chat format), which become one
typed `LaunchOptions` record before the command sees them, and those that describe the machine (`estimate`, `plan`).
Only click is imported here, so `lcrun --help` stays instant."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .param_types import (CONTEXT, EFFECTIVE, KV_TYPE, MEMORY, RPC_ENDPOINTS, RPC_MEMORY, RUN_CONTEXT, kv_type_from,
                          worker_memory_map)

if TYPE_CHECKING:
    from .launch.options import LaunchOptions

F = TypeVar("F", bound=Callable[..., Any])

# Each option is declared once; the lists below pick them for each kind of command. lcrun's names come first,
# llama.cpp's (and llama-server's) spellings beside them as aliases of the same option.
_HUB_FILE_HELP = "When MODEL is a Hub repo and its :QUANT does not pick one file: the GGUF in it (llama.cpp's -hff)."
HUB_FILE = click.option("--hf-file", "--file", "hub_file", metavar="NAME.gguf", help=_HUB_FILE_HELP)
# chat and estimate, where --file adds a document
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

def context_option(help_text: str, *, dest: str = "ctx", multiple: bool = False,
                   default: str | None = None, effective: bool = False) -> Callable[..., Any]:
    """`-c/--ctx/--ctx-size N`, declared here alone: a token count with binary suffixes (32k, 128k, 1M) or `auto`
    (None: the planner decides); with `effective`, also `effective` (EFFECTIVE: the longest context measured good
    that fits). Each command says what the context is for it."""
    return click.option("-c", "--ctx", "--ctx-size", dest, type=RUN_CONTEXT if effective else CONTEXT, metavar="N",
                        multiple=multiple, default=default, show_default=default is not None, help=help_text)


KV_TYPE_HELP = "KV cache type: f16, q8_0, q4_0, or K/V apart (q8_0/q4_0)"
KV_TYPE_OPTION = click.option("--kv-type", type=KV_TYPE, metavar="K[/V]",
                              help=f"{KV_TYPE_HELP}; default: the least lossy that reaches the context.")
# niah: repeatable (the RULER-style suite runs one grid per KV type); the command gets them all as `kv_types`
KV_TYPES_OPTION = click.option("--kv-type", "kv_type", type=KV_TYPE, metavar="K[/V]", multiple=True,
                               help=f"{KV_TYPE_HELP}; default: the least lossy that reaches the context. "
                                    "Repeatable with --suite ruler: one grid per type, the same questions.")

_RUN_OPTIONS = [
    REVISION,
    context_option("Context length (32k, 128k, 1M, …); default: the largest that fits (chat) or what the run needs "
                   "(niah, bench). `effective`: the longest context measured good (lcrun niah MODEL --suite ruler) "
                   "that fits.", effective=True),
    KV_TYPE_OPTION,
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
# every parameter the launch reads: taken out of a command's parameters into its one LaunchOptions
_LAUNCH_PARAMS = frozenset({
    "model", "hub_file", "revision", "ctx", "kv_type", "cache_type_k", "cache_type_v", "flash_attn", "gpu_layers",
    "threads", "threads_batch", "ubatch", "rope_theta", "rope_scale", "rope_freq_scale", "gpu_mem", "ram", "rpc",
    "rpc_mem", "repack", "parallel", "chat_template", "chat_template_file", "raw",
})


def _apply(options: list[Callable[..., Any]], func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(options):
        func = option(func)
    return func


def machine_options(func: Callable[..., Any] | None = None, *,
                    file_flag_free: bool = False) -> Callable[..., Any]:
    """The options that describe the machine and its workers (`estimate`, `plan`): `@machine_options`, or
    `@machine_options(file_flag_free=True)` where --file is the command's own (estimate's documents), so only
    --hf-file names a Hub repo's GGUF, as in chat."""
    options = [HUB_FILE_ONLY if option is HUB_FILE else option for option in _MACHINE_OPTIONS] \
        if file_flag_free else _MACHINE_OPTIONS
    if func is None:
        return lambda f: _apply(options, f)
    return _apply(options, func)


def launch_options(*, chat: bool = True, file_flag_free: bool = False, kv_types: bool = False) -> Callable[[F], F]:
    """The options of a command that loads a model. The command does not see them one by one: its first argument is
    the one typed record they make with MODEL (`LaunchOptions`, built by `launch_options_from`), beside its own
    options. `chat`: the run prompts in a chat format (the command declares which chat-format options it takes);
    `file_flag_free`: --file is the command's own (chat's documents), so only --hf-file names a Hub repo's GGUF;
    `kv_types`: --kv-type is repeatable, and the command gets every type given as `kv_types` (the record holds the
    type when one is given)."""
    def decorate(func: F) -> F:
        @functools.wraps(func)
        def command(**params: Any) -> Any:
            taken = {name: params.pop(name) for name in list(params) if name in _LAUNCH_PARAMS}
            options = launch_options_from(taken, chat=chat)
            if kv_types:
                given = _kv_types_given(taken.get("kv_type"))
                params["kv_types"] = given if len(given) > 1 else tuple(filter(None, [options.kv_type]))
            return func(options, **params)

        hub_file = HUB_FILE_ONLY if file_flag_free else HUB_FILE
        run_options = [KV_TYPES_OPTION if o is KV_TYPE_OPTION else o for o in _RUN_OPTIONS] if kv_types \
            else _RUN_OPTIONS
        return _apply([hub_file, *run_options], command)  # type: ignore[return-value]
    return decorate


def launch_options_from(params: dict[str, Any], *, chat: bool = True) -> LaunchOptions:
    """The LaunchOptions of parsed command-line parameters: llama.cpp's spellings folded into lcrun's (-ctk/-ctv into
    the K/V type, --rope-freq-scale into --rope-scale), conflicts refused."""
    from .launch.options import LaunchOptions

    given = _kv_types_given(params.get("kv_type"))
    if len(given) > 1 and (params.get("cache_type_k") or params.get("cache_type_v")):
        raise click.UsageError("give the KV cache types as --kv-type K[/V] (repeatable), not -ctk/-ctv")
    # several types (niah's suite): the launch is decided for each in turn; the record holds one type or none
    kv = kv_type_from(given[0] if len(given) == 1 else None, params.get("cache_type_k"), params.get("cache_type_v"))
    rope_scale = params.get("rope_scale")
    if params.get("rope_freq_scale") is not None:
        if rope_scale is not None:
            raise click.UsageError("give the RoPE scaling once: --rope-scale, or --rope-freq-scale (its inverse)")
        if params["rope_freq_scale"] <= 0:
            raise click.BadParameter("must be above 0", param_hint="--rope-freq-scale")
        rope_scale = 1.0 / params["rope_freq_scale"]
    ctx = params.get("ctx")
    return LaunchOptions(
        model=params.get("model") or "", hub_file=params.get("hub_file"), revision=params.get("revision"),
        ctx=None if ctx == EFFECTIVE else ctx, effective_ctx=ctx == EFFECTIVE, kv_type=kv,
        flash_attn=params.get("flash_attn") or "auto",
        gpu_layers=params.get("gpu_layers"), threads=params.get("threads"),
        threads_batch=params.get("threads_batch"), ubatch=params.get("ubatch") or 512,
        rope_theta=params.get("rope_theta"), rope_scale=rope_scale,
        gpu_mem=tuple(params["gpu_mem"]) if params.get("gpu_mem") else None, ram=params.get("ram"),
        rpc=tuple(params.get("rpc") or ()), rpc_mem=tuple(worker_memory_map(params.get("rpc_mem")).items()),
        repack=params.get("repack"), n_seq=params.get("parallel") or 1,
        chat=chat, chat_format=_chat_format_from(params) if chat else None,
    )


def _kv_types_given(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """--kv-type as given: one type, or several where the option is repeatable; each once, in order."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return tuple(dict.fromkeys(k for k in values if k))


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
    """--chat-template, --chat-template-file and --raw: they become LaunchOptions.chat_format."""
    return chat_template_options(RAW_OPTION(func))


def _chat_format_from(options: dict[str, Any]) -> Any:
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
