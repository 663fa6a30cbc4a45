"""Files that appear whole or not at all: written to `<name>.<PID-START>.partial` — named by the process writing it
(lcrun.process_files), so another lcrun cleaning up after a killed one never removes a write in progress — fsynced,
renamed over the name (an atomic replace on POSIX and Windows) and the rename fsynced in its directory, so a crash after
it cannot bring the old file back; the partial file is removed on any failure. A kill, a full disk or Ctrl-C never
leaves a half-written file under the real name. This is the application's one atomic write (sessions, niah summaries
and pictures, the disk prompt cache, re-quantized GGUFs, the engine's state files, which llama.cpp writes into the
partial file); lcrun.convert keeps its own copy for its split outputs (it imports nothing of the application)."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import LcrunError
from .process_files import process_tag, remove_stale


def partial_path(path: Path) -> Path:
    """Where this process writes `path` before renaming it into place: `<name>.<PID-START>.partial`."""
    return path.with_name(f"{path.name}.{process_tag()}.partial")


def remove_stale_partials(path: Path) -> list[Path]:
    """The partial files of `path` that a killed writer left (their writer is gone; a live one's are kept)."""
    return remove_stale(path.parent, rf"{re.escape(path.name)}\.(\d+-\d+)\.partial")


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a crash after it cannot bring the old name back)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory: the rename is as durable as they make it
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yields the partial path to write (by this process or by a library, such as llama.cpp's quantizer output);
    when the block ends normally the file is fsynced, renamed to `path` and the rename synced, otherwise removed."""
    partial = partial_path(path)
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomic(path: Path, data: str | bytes | Sequence[bytes], *, make_parents: bool = False, private: bool = False,
                 error: type[LcrunError] = LcrunError) -> None:
    """`data` as the whole content of `path`: text (UTF-8), bytes, or several pieces of bytes written one after the
    other (a large state is not copied to join it). `private`: the file is created 0600 (it never exists with wider
    permissions). The partial file is created anew, never opened through a link left under its name. An OSError
    becomes one line naming the file, as `error`."""
    pieces = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as partial:
            partial.unlink(missing_ok=True)  # a link someone left there goes; what it points to is untouched
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            with os.fdopen(os.open(partial, flags, 0o600 if private else 0o666), "wb") as f:
                for piece in pieces:
                    f.write(piece)
    except OSError as exc:
        raise error(str(path), f"cannot be written ({exc.strerror or exc})") from None
