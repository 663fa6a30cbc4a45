"""Options shared by the commands that load a model (`chat`, `niah`, `bench`): the planner's choices, each of which
the user can force, and the chat format (`chat`, `niah`). Only click is imported here, so `lcrun --help` stays
instant."""
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
    from .cli import parse_ctx, parse_memory
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
    for option in reversed(CHAT_TEMPLATE_OPTIONS):
        func = option(func)
    return func


def chat_format_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--chat-template, --chat-template-file and --raw; the command receives them as keyword arguments (see
    `chat_format_from`)."""
    return chat_template_options(RAW_OPTION(func))


CHAT_FORMAT_OPTION_NAMES = ("chat_template", "chat_template_file", "raw")


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
