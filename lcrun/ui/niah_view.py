"""`lcrun niah` on screen: a progress bar over the grid while it runs, then the heatmap — rows are needle depths,
columns context lengths, each cell coloured from red (never found) to green (always found), as in Gradient's
picture — and the same heatmap recorded as SVG or HTML."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich import box
from rich.color import Color
from rich.console import Console, Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from lcrun.atomic_files import write_atomic
from lcrun.niah.run import CellDone, CellPrefill, CellStarted, NiahEvent, RunStarted

from .grid_progress import GridProgress

_STOPS = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]  # red, yellow, green


def score_color(score: float, *, basic: bool = False) -> Color:
    """Red → yellow → green. `basic`: one of the three named colours, for 8- and 16-colour terminals (rich's
    nearest-colour match turns this red into yellow there)."""
    if basic:
        return Color.parse("red" if score < 1 / 3 else "yellow" if score < 2 / 3 else "green")
    for (x0, c0), (x1, c1) in zip(_STOPS, _STOPS[1:]):
        if score <= x1:
            t = (score - x0) / (x1 - x0)
            return Color.from_rgb(*(round(a + (b - a) * t) for a, b in zip(c0, c1)))
    return Color.from_rgb(*_STOPS[-1][1])


def ctx_label(ctx: int) -> str:
    if ctx < 1000:
        return str(ctx)
    if ctx < 10_000:
        return f"{ctx / 1000:.1f}k"
    if ctx < 1_000_000:
        return f"{ctx / 1000:.0f}k"
    return f"{ctx / 1_000_000:.2f}M"


def _cell(score: float | None, basic: bool) -> Text:
    if score is None:
        return Text("  · ", style="dim")
    return Text(f"{100 * score:>3.0f} ", style=Style(color="black", bgcolor=score_color(score, basic=basic)))


def _kv(engine: dict[str, Any]) -> str:
    k, v = engine.get("type_k"), engine.get("type_v")
    return f"KV {k}" if k == v else f"KV {k}/{v}"


def heatmap(summary: dict[str, Any], *, basic_colors: bool = False) -> Group:
    """The summary as a table: one row per depth (0% = the needle opens the document), one column per context."""
    score = summary["score"]
    title = (f"needle in a haystack · {summary['model']} · {_kv(summary['engine'])} · "
             f"score {'–' if score is None else f'{100 * score:.0f}%'}")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, show_footer=True, padding=(0, 0), collapse_padding=True)
    table.add_column("depth", justify="right", footer="mean", no_wrap=True)
    for ctx, mean in zip(summary["contexts"], summary["context_scores"]):
        table.add_column(Text(ctx_label(ctx), justify="right"), justify="right", no_wrap=True,
                         footer=_mean_text(mean))
    table.add_column(" mean", justify="right", no_wrap=True)
    for depth, row, mean in zip(summary["depths"], summary["scores"], summary["depth_scores"]):
        table.add_row(f"{100 * depth:.0f}% ", *(_cell(s, basic_colors) for s in row), _mean_text(mean))
    samples = summary["parameters"]["samples"]
    caption = Text(f"cells: % of {samples} sample{'s' if samples != 1 else ''} whose answer held the "
                   f"{summary['parameters']['digits']}-digit number · columns: context length in tokens · "
                   f"{summary['cells_done']}/{summary['cells_total']} cells done", style="dim")
    notes = [Text(f"note: {note}", style="dim") for note in summary["notes"]]
    return Group(Text(title, style="bold"), table, caption, *notes)


def _mean_text(mean: float | None) -> Text:
    return Text("  – " if mean is None else f"{100 * mean:>3.0f} ", style="bold")


def render_heatmap(summary: dict[str, Any], console: Console) -> None:
    console.print(heatmap(summary, basic_colors=console.color_system in ("standard", "windows")))


def export_picture(summary: dict[str, Any], *, svg: Path | None = None, html: Path | None = None) -> None:
    """The heatmap in colour whatever the terminal (NO_COLOR is about terminals, not pictures)."""
    width = max(80, 12 + 5 * (len(summary["contexts"]) + 1))
    console = Console(record=True, file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor",
                      no_color=False, highlight=False)
    render_heatmap(summary, console)
    title = f"lcrun niah · {summary['model']}"
    for path, text in ((svg, lambda: console.export_svg(title=title, clear=False)),
                       (html, lambda: console.export_html(clear=False))):
        if path is not None:
            write_atomic(path, text())


class NiahProgress(GridProgress):
    """A bar over the grid, weighted by context length (a 1M-token cell is not a 100-token one), moving during each
    cell's prefill; only on a terminal. Elsewhere, one line per finished cell."""

    def update(self, event: NiahEvent) -> None:
        if isinstance(event, RunStarted):
            if event.done:
                self.console.print(f"resuming: {event.done} of {event.total} cells already done", highlight=False)
            self._start("niah", event.total, event.done, sum(c.ctx for c in event.todo))
        elif isinstance(event, CellStarted):
            cell = event.cell
            self._describe(f"ctx {cell.ctx:,} · depth {100 * cell.depth:.0f}%")
        elif isinstance(event, CellPrefill):
            self._prefill(event.cell.ctx, event.done, event.total)
        elif isinstance(event, CellDone):
            r = event.record
            self._cell_done(event.cell.ctx, f"ctx {r['ctx']:,} depth {100 * r['depth']:.0f}% sample {r['sample']}: "
                                            f"score {r['score']} ({r['seconds']:.1f} s)")
