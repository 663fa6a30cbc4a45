"""The documents of a chat as counted before the model loads: one row each — name, pages or files, characters, tokens
for this model and, when `lcrun bench` measured this machine with these settings, the time to prefill it — and one
line saying how they fit the context. The same table for `chat -f`, `chat -p -f` (on stderr) and `--dry-run`."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .console import is_plain

if TYPE_CHECKING:   # a chat without documents imports none of their planning
    from lcrun.chat.document_plan import DocumentPlan


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def reading_status(console: Console) -> Callable[[str], AbstractContextManager[Any]]:
    """What to show while documents are read and counted: a spinner on a terminal, nothing elsewhere."""
    def reading(what: str) -> AbstractContextManager[Any]:
        return nullcontext() if is_plain(console) else console.status(what)
    return reading


def render_documents(plan: DocumentPlan, console: Console) -> None:
    timed = plan.speed is not None
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("document")
    table.add_column("pages/files", justify="right")
    table.add_column("characters", justify="right")
    table.add_column("tokens", justify="right")
    if timed:
        table.add_column("prefill", justify="right")
    for row in plan.rows:
        cells = [escape(row.document.name), row.document.parts or "—", f"{row.document.characters:,}",
                 f"{row.tokens:,}"]
        if timed:
            cells.append(duration(row.prefill_s or 0.0))
        table.add_row(*cells)
    if len(plan.rows) > 1:
        total = ["[bold]total[/]", "", f"{sum(r.document.characters for r in plan.rows):,}",
                 f"{plan.document_tokens:,}"]
        table.add_row(*total, *([duration(plan.prefill_s or 0.0)] if timed else []))
    console.print(table)
    for row in plan.rows:
        for warning in row.document.warnings:
            console.print(f"[yellow]warning:[/] {escape(row.document.name)}: {escape(warning)}")
    for name in plan.already:
        console.print(f"[dim]{escape(name)}: already in the session (not added again)[/]")
    console.print(f"prompt {plan.prompt_tokens:,} tokens + {plan.reserve:,} for {plan.reserve_for} → context "
                  f"{plan.n_ctx:,} ({plan.how}); counted with the model's tokenizer in {plan.count_s:.1f} s",
                  highlight=False)
    if plan.speed is not None:
        guess = "; deeper than bench measured: extrapolated" if plan.extrapolated else ""
        console.print(f"[dim]prefill at this machine's speed as `lcrun bench` measured it with these settings "
                      f"({escape(plan.speed.measured_at[:10])}{guess})[/]", highlight=False)
