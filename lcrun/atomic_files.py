"""Files that appear whole or not at all: written to `<name>.partial`, fsynced, then renamed over the name (an atomic
replace on POSIX and Windows), the partial file removed on any failure — so a kill, a full disk or Ctrl-C never leaves
a half-written file under the real name. lcrun.convert keeps its own copy for its split outputs (it imports nothing
of the application)."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import LcrunError


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yields the partial path to write (by this process or by a library, such as llama.cpp's state or quantizer
    output); when the block ends normally the file is fsynced and renamed to `path`, otherwise removed."""
    partial = partial_path(path)
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes | Sequence[bytes], *, make_parents: bool = False,
                 error: type[LcrunError] = LcrunError) -> None:
    """`data` as the whole content of `path`: text (UTF-8), bytes, or several pieces of bytes written one after the
    other (a large state is not copied to join it). An OSError becomes one line naming the file, as `error`."""
    pieces = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as partial, open(partial, "wb") as f:
            for piece in pieces:
                f.write(piece)
    except OSError as exc:
        raise error(str(path), f"cannot be written ({exc.strerror or exc})") from None
