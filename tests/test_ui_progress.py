"""The progress bars rendered into a capture console with an injected clock."""
from __future__ import annotations

import io
from itertools import count

from rich.console import Console

from lcrun.ui.progress import phase_progress


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=110, color_system=None), buffer


def test_phases_show_bytes_speed_and_tensor_counts() -> None:
    console, buffer = _console()
    ticks = count()
    with phase_progress(console, get_time=lambda: float(next(ticks))) as progress:
        convert = progress("convert")
        assert convert is not None
        for done in range(0, 101 << 20, 10 << 20):
            convert(done, 100 << 20)
        quantize = progress("quantize")
        assert quantize is not None
        for done in range(1, 23):
            quantize(done, 22)
    text = buffer.getvalue()
    assert "Converting" in text and "104.9 MB" in text and "/s" in text
    assert "Quantizing (llama.cpp)" in text and "22/22" in text and "tensors" in text


def test_quiet_and_non_terminal_print_nothing() -> None:
    console, buffer = _console()
    with phase_progress(console, quiet=True) as progress:
        assert progress("convert") is None
    plain = Console(file=io.StringIO(), force_terminal=False)
    with phase_progress(plain) as progress:
        assert progress("download") is None
    assert buffer.getvalue() == "" and plain.file.getvalue() == ""
