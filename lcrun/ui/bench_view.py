"""The bench table: the model and the plan it ran with, then per depth pp and tg tokens/s as mean ± stddev."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from lcrun.bench import BenchReport, Rate
from lcrun.memory_model import kv_type_name


def _rate(rate: Rate | None) -> str:
    if rate is None:
        return "-"
    return f"{rate.mean:,.2f} ± {rate.stddev:,.2f}"


def plan_line(report: BenchReport) -> str:
    kv = kv_type_name(report.type_k, report.type_v)
    return (f"context {report.ctx:,} · KV {kv} · flash attention {'on' if report.flash_attn else 'off'} · "
            f"GPU layers {report.n_gpu_layers}/{report.n_layer + 1} · threads {report.n_threads or 'auto'} · "
            f"batch {report.n_batch}/{report.n_ubatch}")


def render_bench(report: BenchReport, console: Console) -> None:
    console.print(Text(f"{report.model}  ·  {report.file_type or '?'}", style="bold"))
    console.print(Text(plan_line(report), style="dim"))
    table = Table(caption=f"tokens/s, mean ± stddev of {report.repetitions} repetition(s); depth = tokens already "
                          "in the KV cache", caption_justify="left")
    table.add_column("depth", justify="right")
    table.add_column(f"pp{report.pp} t/s", justify="right")
    table.add_column(f"tg{report.tg} t/s", justify="right")
    for result in report.results:
        table.add_row(f"{result.depth:,}", _rate(result.pp_rate), _rate(result.tg_rate))
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


@contextmanager
def bench_progress(console: Console) -> Iterator[Callable[[str, int, int], None] | None]:
    """A bar per step (warm-up, each fill, each depth's repetitions) when a person is watching; nothing otherwise."""
    if not console.is_terminal:
        yield None
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    tasks: dict[str, TaskID] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = progress.add_task(what, total=total)
        progress.update(tasks[what], completed=done, total=total)

    with progress:
        yield update
