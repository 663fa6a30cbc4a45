"""The chat's screen: streamed Markdown prints every settled line exactly once (nothing duplicated, nothing lost),
repaints only a small tail, and plain output passes text straight through."""
from __future__ import annotations

import io
import random

from rich.console import Console
from rich.markdown import Markdown
from rich.text import Text

from lcrun.ui.chat_view import MarkdownStream, PlainStream, make_stream, status_text

ANSWER = "\n".join(
    [f"## Part {i}\n\nParagraph {i} has **bold** words and `code`, and it is long enough to wrap on a narrow "
     f"screen, which is where duplicated lines used to show up.\n\n- item {i}.1\n- item {i}.2\n\n"
     f"```python\ndef f{i}(x):\n    return x * {i}\n```\n" for i in range(6)])


class RecordingConsole(Console):
    """A terminal console that remembers what was printed (settled lines) apart from live repaints."""

    def __init__(self) -> None:
        super().__init__(file=io.StringIO(), force_terminal=True, width=60, height=12, color_system="standard")
        self.printed: list[str] = []

    def print(self, *objects, **kwargs) -> None:  # type: ignore[no-untyped-def,override]
        self.printed.extend(o.plain for o in objects if isinstance(o, Text))
        super().print(*objects, **kwargs)


def rendered_lines(text: str, width: int) -> list[str]:
    sink = Console(file=io.StringIO(), width=width, force_terminal=True, color_system="standard")
    sink.print(Markdown(text))
    return Text.from_ansi(sink.file.getvalue().rstrip("\n")).plain.split("\n")  # type: ignore[attr-defined]


def test_settled_lines_are_printed_once_and_all_of_them() -> None:
    console = RecordingConsole()
    clock = iter(range(10**6))
    stream = MarkdownStream(console, live_lines=4, min_interval=0.0, get_time=lambda: float(next(clock)))
    rng = random.Random(3)
    i, repaints = 0, 0
    while i < len(ANSWER):
        step = rng.randint(1, 12)
        painted_before = stream._last_paint
        stream.add(ANSWER[i : i + step])
        i += step
        if stream._last_paint != painted_before:  # repainted now (slow renders back off)
            repaints += 1
            in_progress = stream.text[stream.block_start:]
            tail = len(rendered_lines(in_progress, console.width - 1)) - stream.printed if in_progress.strip() else 0
            assert tail <= console.height - 4  # the live region never outgrows the screen
    stream.finish()
    printed = "\n".join(console.printed).split("\n")
    assert non_blank(printed) == non_blank(rendered_lines(ANSWER, console.width - 1))
    assert len(console.printed) > 10  # settled progressively while streaming, not all at the end
    assert repaints > 20


def non_blank(lines: list[str]) -> list[str]:
    return [line.rstrip() for line in lines if line.strip()]


TABLE = ("Intro paragraph.\n\n| name | value |\n|---|---|\n| a | 1 |\n| a much longer name | 22222 |\n"
         "| b | 3 |\n\nAfter the *table, an emphasis that\nruns over\nseveral\nlines\nof\ntext* to the end.\n\nDone.")


def test_a_table_or_an_emphasis_is_printed_only_once_complete() -> None:
    console = RecordingConsole()
    stream = MarkdownStream(console, live_lines=2, min_interval=0.0, get_time=lambda: 0.0)
    for ch in TABLE:
        stream._last_paint = -1e9
        stream.add(ch)
    stream.finish()
    printed = non_blank("\n".join(console.printed).split("\n"))
    assert printed == non_blank(rendered_lines(TABLE, console.width - 1))
    assert not any("*" in line for line in printed)  # the emphasis was rendered, not left as a literal star


def test_block_boundary_ignores_blank_lines_inside_code_fences() -> None:
    from lcrun.ui.chat_view import block_boundary

    text = "para\n\n```\ncode\n\nmore code\n```\n\nnext"
    assert block_boundary(text, 0) == text.index("next")
    assert block_boundary(text[: text.index("more")], 0) == len("para\n\n")


def test_negative_control_a_stream_without_settling_would_duplicate() -> None:
    """If the printed-line counter were ignored, earlier lines would be printed again: the check above sees it."""
    console = RecordingConsole()
    stream = MarkdownStream(console, live_lines=2, min_interval=0.0, get_time=lambda: 0.0)
    stream.add(ANSWER[:400])
    stream._last_paint = -1e9
    stream.block_start = 0  # forget what was printed
    stream.add(ANSWER[400:800])
    stream.finish()
    printed = "\n".join(console.printed).split("\n")
    assert non_blank(printed) != non_blank(rendered_lines(ANSWER[:800], console.width - 1))


def test_plain_output_is_the_text_itself() -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    stream = make_stream(console)
    assert isinstance(stream, PlainStream)
    for piece in ["# Title\n", "**not rendered**", " ok"]:
        stream.add(piece)
    stream.finish()
    assert console.file.getvalue() == "# Title\n**not rendered** ok\n"  # type: ignore[attr-defined]
    no_color = Console(file=io.StringIO(), force_terminal=True, no_color=True)
    assert isinstance(make_stream(no_color), PlainStream)


def test_status_line() -> None:
    assert status_text(1536, 2048, tokens_per_s=12.34, ttft_s=0.5, reused=1200, note="stopped") == \
        "ctx 1,536/2,048 █████████░░░ 75% · 12.3 tok/s · TTFT 0.50 s · reused 1,200 · stopped"
