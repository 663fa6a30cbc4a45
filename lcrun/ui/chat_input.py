"""Reading the user's messages: prompt_toolkit (line editing, history across sessions, Alt-Enter for a new line)
when stdin and stdout are a terminal, plain line reading otherwise. Both understand the same multi-line forms
(a trailing backslash, or a block between lines of \"\"\")."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from lcrun.chat.commands import COMMANDS, join_continued

ReadLine = Callable[[str], str]   # raises EOFError on Ctrl-D / end of input, KeyboardInterrupt on Ctrl-C


def read_message(read_line: ReadLine, prompt: str = "> ", continuation: str = ". ") -> str:
    lines = [read_line(prompt)]
    text, complete = join_continued(lines)
    while not complete:
        try:
            lines.append(read_line(continuation))
        except EOFError:
            break
        text, complete = join_continued(lines)
    return text


def plain_reader(stream=None) -> ReadLine:  # type: ignore[no-untyped-def]
    def read_line(prompt: str) -> str:
        source = stream or sys.stdin
        line = source.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")
    return read_line


def terminal_reader(history_file: Path | None) -> ReadLine:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")  # Alt-Enter (Esc then Enter): a new line instead of sending
    def _newline(event) -> None:  # type: ignore[no-untyped-def]
        event.current_buffer.insert_text("\n")

    history = InMemoryHistory()
    if history_file is not None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        except OSError:
            pass  # no place for the input history: keep it for this session only
    session: PromptSession[str] = PromptSession(
        history=history, completer=WordCompleter([f"/{name}" for name in COMMANDS], sentence=True),
        complete_while_typing=False, enable_history_search=True, key_bindings=bindings,
    )

    def read_line(prompt: str) -> str:
        return session.prompt(prompt)
    return read_line


def make_reader(history_file: Path | None) -> ReadLine:
    if sys.stdin.isatty() and sys.stdout.isatty():
        return terminal_reader(history_file)
    return plain_reader()
