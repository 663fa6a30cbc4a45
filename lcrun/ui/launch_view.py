"""What a launch decided, shown before the model loads — the same for `chat`, `serve`, `niah` and `bench`: the plan
panel (file, context, KV type, flash attention, GPU layers, threads, memory per device, why, the chat format,
warnings), or for a one-shot run only its warnings; and what a server's slots get."""
from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from lcrun.memory_model import kv_type_name

from .console import is_plain

if TYPE_CHECKING:
    from lcrun.launch.decide import Launch

MIB = 1 << 20
GIB = 1 << 30


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def render_launch(launch: Launch, console: Console) -> None:
    """The plan panel; with the chat format the model will be prompted in, when the run chats."""
    estimate, spec, cfg, chat_format = launch.choice.estimate, launch.spec, launch.config, launch.chat_format
    where = ", ".join(f"{d.name} {_size(d.bytes)} of {_size(d.free_bytes)} free" for d in estimate.devices if d.bytes)
    lines = [
        f"[bold]{launch.model_path.name}[/] · {spec.file_type or '?'} · {spec.n_layer} layers · "
        f"trained context {spec.n_ctx_train:,}",
        f"context [bold]{estimate.ctx:,}[/] tokens · KV {kv_type_name(estimate.type_k, estimate.type_v)} · "
        f"flash attention {'on' if estimate.flash_attn else 'off'} · "
        f"GPU layers {estimate.n_gpu_layers}/{spec.n_layer + 1} · threads {cfg.n_threads or 'auto'}",
        f"memory {_size(estimate.total_bytes)}: {where}",
        f"[dim]{launch.choice.why}[/]",
    ]
    if launch.recall is not None:   # the file's measured recall (lcrun niah --suite ruler) for this plan
        advice = launch.recall
        lines.append(f"[yellow]warning:[/] {escape(advice.warning)}" if advice.warning else
                     f"[dim]{escape(advice.note)}[/]")
    if chat_format is not None:
        lines.append(f"chat format [bold]{escape(chat_format.what)}[/] · {escape(chat_format.why)}")
    lines += [f"[yellow]warning:[/] {w}" for w in launch.warnings]
    if is_plain(console):
        for line in lines:
            console.print(Text.from_markup(line).plain, markup=False, highlight=False)
        return
    console.print(Panel("\n".join(lines), title="plan", title_align="left", expand=False, border_style="blue"))


def render_launch_notes(launch: Launch, console: Console) -> None:
    """A one-shot run's stderr, instead of the panel: the warnings and the chat format."""
    for warning in launch.warnings:
        console.print(f"warning: {warning}", highlight=False)
    if launch.recall is not None and launch.recall.warning:
        console.print(f"warning: {launch.recall.warning}", highlight=False, markup=False)
    if launch.chat_format is not None:
        console.print(f"chat format: {launch.chat_format.describe()}", style="dim", highlight=False, markup=False)


def render_slots(launch: Launch, console: Console) -> None:
    """How a server's context is split between its slots."""
    n_seq, n_ctx = launch.options.n_seq, launch.config.n_ctx
    console.print(f"{n_seq} slot{'s' if n_seq > 1 else ''} · {n_ctx // n_seq:,} tokens each"
                  + (f" (the {n_ctx:,}-token context split {n_seq} ways)" if n_seq > 1 else ""), highlight=False)
