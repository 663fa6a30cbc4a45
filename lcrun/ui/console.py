"""Consoles: colour and live displays only when a person is watching (a terminal, NO_COLOR unset)."""
from __future__ import annotations

import os
import sys

from rich.console import Console


def make_console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    no_color = "NO_COLOR" in os.environ or not tty
    # a pipe has no width: don't squeeze tables into rich's default 80 columns
    width = None if tty or "COLUMNS" in os.environ else 140
    # a pipe or a file gets whole lines: a one-line message must stay one line whatever the width
    return Console(file=stream, no_color=no_color, highlight=False, soft_wrap=not tty, width=width)


def is_plain(console: Console) -> bool:
    """Plain text, straight through: not a terminal, or NO_COLOR set."""
    return not console.is_terminal or console.no_color
