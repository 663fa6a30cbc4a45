"""The RULER-style suite on screen: the plan before it starts (cells, tokens to prefill, time), a progress bar while
it runs, then one heatmap per KV type — rows the tasks and the suite score, columns the context lengths, each cell
coloured from red (nothing found) to green (everything) — and the effective-context line. Also the one-line recall
note and warning of the plan views."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from lcrun.niah.ruler.run import (CellDone, CellPrefill, CellStarted, KvLoading, SuiteEstimate, SuiteEvent,
                                  SuitePlanned)
from lcrun.niah.ruler.tasks import TASK_LABELS
from lcrun.recall_advice import RecallAdvice, ctx_label

from .grid_progress import GridProgress
from .niah_view import score_color


def _cell(score: float | None, basic: bool) -> Text:
    if score is None:
        return Text("    · ", style="dim")
    return Text(f"{score:>5.1f} ", style=Style(color="black", bgcolor=score_color(score / 100, basic=basic)))


def _suite_cell(score: float | None, threshold: float) -> Text:
    if score is None:
        return Text("    – ", style="bold dim")
    return Text(f"{score:>5.1f} ", style="bold green" if score >= threshold else "bold red")


def _effective(entry: dict[str, Any]) -> str:
    effective, failing = entry["effective_context"], entry["first_failing"]
    if effective is None:
        return "effective context not measured yet"
    if effective == 0:
        return f"below {ctx_label(failing)}"
    return f"effective context {'≥' if failing is None else ''}{ctx_label(effective)}"


def heatmap(summary: dict[str, Any], entry: dict[str, Any], *, basic_colors: bool = False) -> Group:
    """One KV type's table: a row per task, the suite score below, a column per length."""
    threshold = summary["threshold"]
    title = f"RULER-style suite · {summary['model']} · KV {entry['kv']} · {_effective(entry)}"
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, show_footer=True, padding=(0, 0), collapse_padding=True)
    table.add_column("task", footer="suite", no_wrap=True)
    for ctx, value in zip(summary["lengths"], entry["length_scores"]):
        table.add_column(Text(ctx_label(ctx), justify="right"), justify="right", no_wrap=True,
                         footer=_suite_cell(value, threshold))
    for task in summary["tasks"]:
        table.add_row(f"{TASK_LABELS[task]} ", *(_cell(s, basic_colors) for s in entry["scores"][task]))
    samples = summary["samples"]
    caption = Text(f"cells: % of the expected answers found (RULER's string_match_all), over {samples} "
                   f"sample{'s' if samples != 1 else ''} · suite: the mean over the tasks, passing at ≥ "
                   f"{threshold:g} · columns: context length in tokens · {entry['cells_done']}/"
                   f"{entry['cells_total']} cells done", style="dim")
    return Group(Text(title, style="bold"), table, caption)


def render_summary(summary: dict[str, Any], console: Console) -> None:
    basic = console.color_system in ("standard", "windows")
    for entry in summary["kv_types"]:
        console.print(heatmap(summary, entry, basic_colors=basic))
        console.print()
    prefill = summary["prefill"]
    if prefill["prefilled_tokens"]:
        console.print(Text(f"prefilled {prefill['prefilled_tokens']:,} tokens for prompts of "
                           f"{prefill['prompt_tokens']:,} ({prefill['saved']:g}× fewer: documents shared between "
                           "tasks)", style="dim"))
    for note in summary["notes"]:
        console.print(Text(f"note: {note}", style="dim"))
    console.print(Text(summary["line"], style="bold"))


def render_recall_advice(advice: RecallAdvice, console: Console) -> None:
    """The plan views' line: the measured effective context for the chosen KV type, or the warning."""
    if advice.warning:
        console.print(Text(f"warning: {advice.warning}", style="bold yellow"))
    else:
        console.print(Text(advice.note, style="dim"))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_plan(event: SuitePlanned) -> str:
    saved = event.prompt_tokens / event.prefill_tokens if event.prefill_tokens else 1.0
    when = f" · about {_duration(event.seconds)}" if event.seconds is not None else ""
    done = f" ({event.done} done before)" if event.done else ""
    return (f"{len(event.todo)} of {event.total} cells to run{done} · about {event.prefill_tokens:,} tokens to "
            f"prefill ({event.prompt_tokens:,} without shared documents, {saved:.1f}× more){when}")


class SuiteProgress(GridProgress):
    """A bar over the tokens to prefill (a shared document's later questions cost little), moving during each
    prefill; only on a terminal. Elsewhere, one line per finished cell."""

    current = 0   # the running cell's tokens to prefill

    def update(self, event: SuiteEvent) -> None:
        if isinstance(event, SuitePlanned):
            self.console.print(describe_plan(event), highlight=False)
            self._start("ruler", event.total, event.done, event.prefill_tokens)
        elif isinstance(event, SuiteEstimate):
            rate = event.throughput
            self.console.print(f"about {_duration(event.seconds)} to go, at the first cell's speed (prefill "
                               f"{rate.prefill_tokens_per_s:,.0f} tokens/s, {rate.answer_seconds:.1f} s an answer; "
                               "longer contexts prefill slower)", highlight=False)
        elif isinstance(event, KvLoading):
            self.console.print(f"loading with KV {event.kv} and a context of {event.n_ctx:,} tokens", highlight=False)
        elif isinstance(event, CellStarted):
            self.current = event.prompt_tokens - event.cached_tokens
            cell = event.cell
            self._describe(f"{cell.kv} · {ctx_label(cell.ctx)} · {cell.task}")
        elif isinstance(event, CellPrefill):
            self._prefill(self.current, event.done, event.total)
        elif isinstance(event, CellDone):
            r = event.record
            self._cell_done(self.current, f"KV {r['kv']} ctx {r['ctx']:,} {r['task']} sample {r['sample']}: "
                                          f"{100 * r['score']:.0f}% ({r['seconds']:.1f} s)")
