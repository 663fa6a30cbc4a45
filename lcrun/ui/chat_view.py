"""What the chat shows: the reply streaming as Markdown (settled lines printed once, only a small tail
repainted — a live region taller than the screen duplicates text), the status line, prefill progress, /ctx and
/stats. Plain text, straight through, when the output is not a terminal or NO_COLOR is set."""
from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .console import is_plain

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls and DEL, except tab and newline


def meter(used: int, total: int, width: int = 20) -> str:
    filled = min(width, round(width * used / total)) if total else 0
    return "█" * filled + "░" * (width - filled)


def status_text(used: int, n_ctx: int, *, tokens_per_s: float | None = None, ttft_s: float | None = None,
                reused: int | None = None, note: str = "", width: int | None = None) -> str:
    """One line; on a narrow screen the meter and then the reuse count go first."""
    line = _status(used, n_ctx, tokens_per_s, ttft_s, reused, note, bar=True)
    if width is not None and len(line) >= width:
        line = _status(used, n_ctx, tokens_per_s, ttft_s, reused, note, bar=False)
    if width is not None and len(line) >= width:
        line = _status(used, n_ctx, tokens_per_s, ttft_s, None, note, bar=False)
    return line


def _status(used: int, n_ctx: int, tokens_per_s: float | None, ttft_s: float | None, reused: int | None, note: str,
            *, bar: bool) -> str:
    meter_text = f" {meter(used, n_ctx, 12)}" if bar else ""
    parts = [f"ctx {used:,}/{n_ctx:,}{meter_text} {100 * used / n_ctx:.0f}%"]
    if tokens_per_s:
        parts.append(f"{tokens_per_s:.1f} tok/s")
    if ttft_s is not None:
        parts.append(f"TTFT {ttft_s:.2f} s")
    if reused:
        parts.append(f"reused {reused:,}")
    if note:
        parts.append(note)
    return " · ".join(parts)


# -- streaming a reply ------------------------------------------------------------------------------------------
class PlainStream:
    """Text as it comes, no markup, no repaint: for pipes, files and NO_COLOR."""

    def __init__(self, console: Console) -> None:
        self.file = console.file
        # a terminal (NO_COLOR) must not receive the model's escape sequences; a pipe gets the text untouched
        self.scrub = console.is_terminal

    def add(self, delta: str) -> None:
        self.file.write(_CONTROL.sub("", delta) if self.scrub else delta)
        self.file.flush()

    def status(self, text: str) -> None:
        pass

    def finish(self) -> None:
        self.file.write("\n")
        self.file.flush()


class MarkdownStream:
    """The reply rendered as Markdown while it streams. Complete blocks (up to the last blank line outside a code
    fence) are printed once, above the live region, and never again — a table's widths or an emphasis span can only
    change until its block ends. Only the block in progress and the status line are repainted, at most every
    `min_interval` seconds (more when rendering gets slow); a block taller than the screen (less 4 lines, at least
    `live_lines`) settles its top lines one by one, so the live region never outgrows the screen."""

    def __init__(self, console: Console, *, live_lines: int = 6, min_interval: float = 0.05,
                 get_time: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.live_lines = live_lines
        self.min_interval = min_interval
        self.get_time = get_time
        self.text = ""
        self.block_start = 0     # text before this was printed as complete blocks
        self.printed = 0         # lines of the block in progress already printed (a tall block)
        self._blocks_printed = 0
        self._status = ""
        self._last_paint = -1e9
        self._live = Live(console=console, auto_refresh=False, transient=True, vertical_overflow="crop")
        self._live.start()

    def _lines(self, text: str) -> list[str]:
        width = max(20, self.console.width - 1)
        sink = Console(file=io.StringIO(), width=width, force_terminal=True,
                       color_system=self.console.color_system or "standard", highlight=False)
        from rich.markdown import Markdown  # markdown-it and pygments: loaded when a reply first renders

        sink.print(Markdown(text, code_theme="monokai"))
        return sink.file.getvalue().rstrip("\n").split("\n")  # type: ignore[attr-defined]

    def add(self, delta: str) -> None:
        self.text += delta
        now = self.get_time()
        if now - self._last_paint >= self.min_interval:
            started = time.perf_counter()
            self._paint(final=False)
            # rendering the block in progress grows with its length: back off so it never dominates
            self.min_interval = max(self.min_interval, 10 * (time.perf_counter() - started))
            self._last_paint = now

    def status(self, text: str) -> None:
        self._status = text

    def _print(self, lines: list[str]) -> None:
        if lines:
            self._live.console.print(Text.from_ansi("\n".join(lines)))

    def _paint(self, *, final: bool) -> None:
        boundary = len(self.text) if final else block_boundary(self.text, self.block_start)
        if boundary > self.block_start:
            chunk = self.text[self.block_start:boundary]
            if chunk.strip():
                lines = self._lines(chunk)
                self._print(([""] if self._blocks_printed and not self.printed else []) + lines[self.printed:])
                self._blocks_printed += 1
            self.block_start, self.printed = boundary, 0
        if final:
            return
        rest = self.text[self.block_start:]
        lines = self._lines(rest) if rest.strip() else []
        room = max(self.live_lines, self.console.height - 4)  # a live region taller than the screen duplicates text
        settled = max(0, len(lines) - room)
        if settled > self.printed:  # a block taller than the screen: settle its top lines
            self._print(([""] if self._blocks_printed and not self.printed else []) + lines[self.printed:settled])
            self.printed = settled
        tail = Text.from_ansi("\n".join(lines[self.printed:]))
        self._live.update(Group(tail, Text(self._status, style="dim")), refresh=True)

    def finish(self) -> None:
        self._paint(final=True)
        self._live.update(Text(""), refresh=True)
        self._live.stop()


def block_boundary(text: str, start: int) -> int:
    """Where the last complete Markdown block ends: after the last blank line that is not inside a code fence
    (`start` if there is none)."""
    boundary, in_fence, pos = start, False, start
    for line in text[start:].splitlines(keepends=True):
        pos += len(line)
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not stripped and not in_fence and line.endswith("\n") and pos < len(text):
            boundary = pos
    return boundary


def make_stream(console: Console, **kw: Any) -> PlainStream | MarkdownStream:
    return PlainStream(console) if is_plain(console) else MarkdownStream(console, **kw)


class PrefillBar:
    """A bar with tokens/s and ETA, for prefills big enough to wait for (terminal only). `stop()` before another
    live display starts: rich runs one at a time."""

    def __init__(self, console: Console, label: str, *, min_tokens: int = 2048) -> None:
        self.console, self.label, self.min_tokens = console, label, min_tokens
        self._progress: Progress | None = None
        self._task: Any = None
        self._started = time.perf_counter()

    def update(self, done: int, total: int) -> None:
        if is_plain(self.console) or total < self.min_tokens:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.completed:,}/{task.total:,} tokens"), TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(), TextColumn("[dim]Ctrl-C cancels"), console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=total, rate="")
        elapsed = time.perf_counter() - self._started
        self._progress.update(self._task, completed=done, rate=f"{done / elapsed:,.0f} tok/s" if elapsed > 0 else "")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# -- /ctx, /stats, /help ----------------------------------------------------------------------------------------
def render_usage(usage: Any, console: Console) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()

    def pct(n: int) -> str:
        return f"{100 * n / usage.n_ctx:5.1f}%"

    table.add_row("system prompt", f"{usage.system:,}", pct(usage.system))
    for name, n in usage.documents:
        table.add_row(f"document {name}", f"{n:,}", pct(n))
    table.add_row(f"turns ({usage.n_turns})", f"{usage.turns:,}", pct(usage.turns))
    table.add_row("reply header", f"{usage.reply_header:,}", pct(usage.reply_header))
    table.add_row("prompt now", f"{usage.prompt:,}", pct(usage.prompt))
    table.add_row("free", f"{usage.free:,}", f"{pct(usage.free)}  ({usage.reserve:,} kept for each reply)")
    table.add_row("in the KV cache", f"{usage.cached:,}", "reused by the next turn up to the first change")
    console.print(f"context {usage.prompt:,}/{usage.n_ctx:,} {meter(usage.prompt, usage.n_ctx)}")
    console.print(table)


def render_stats(stats: Any, console: Console) -> None:
    last = stats.last
    if last is None:
        console.print("no turns yet")
        return
    console.print(
        f"last turn: {last.prompt_tokens:,} prompt tokens ({last.reused_tokens:,} reused from the cache, "
        f"{last.prompt_tokens - last.reused_tokens:,} evaluated at {last.prefill_tokens_per_s:,.1f} tok/s), "
        f"{last.completion_tokens:,} generated at {last.gen_tokens_per_s:.1f} tok/s, "
        f"time to first token {last.time_to_first_token_s:.2f} s, ended by {last.reason}")
    console.print(
        f"session: {stats.turns} turn(s), {stats.prompt_tokens_evaluated:,} prompt tokens evaluated, "
        f"{stats.reused_tokens:,} reused, {stats.completion_tokens:,} generated, "
        f"{stats.dropped_turns} turn(s) dropped for room")


def render_help(commands: dict[str, tuple[str, str]], console: Console) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for name, (arg, text) in commands.items():
        table.add_row(f"/{name} {arg}".rstrip(), text)
    console.print(table)
    console.print("Enter sends; a line ending in \\ continues, and a line of \"\"\" opens and closes a multi-line "
                  "block (in a terminal, Alt-Enter also adds a line). Ctrl-C stops a reply; Ctrl-D leaves.")
