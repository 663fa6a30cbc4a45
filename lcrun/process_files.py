"""Files a process writes and nobody else may remove while it lives: named by the process (its id and its start time,
so a reused id is not mistaken for the writer), removed by a later process only once their writer is gone — a
`.partial` a killed writer left, a quantizer's intermediate — and never while their writer still runs, whether that
writer is this lcrun or another one sharing the directory. lcrun.atomic_files names its `.partial` files by
`process_tag`."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

_TAG = re.compile(r"(\d+)-(\d+)")
UNTAGGED_STALE_S = 3600   # a `.partial` of an older lcrun (no tag) untouched this long has no writer left


def process_tag(pid: int | None = None) -> str:
    """`PID-START`: the process id and its start time in centiseconds (psutil's create_time)."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return f"{pid}-{round(psutil.Process(pid).create_time() * 100)}"


def tag_alive(tag: str) -> bool:
    """Whether the process a tag names still runs (the same process: same id, same start time)."""
    import psutil

    match = _TAG.fullmatch(tag)
    if match is None:
        return False
    try:
        return process_tag(int(match.group(1))) == tag
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return False


def stale_files(directory: Path, pattern: str) -> list[Path]:
    """Files in `directory` named by `pattern` (a regular expression with one group, the writer's tag, matching the
    whole name) whose writer is gone."""
    regex = re.compile(pattern)
    found = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        match = regex.fullmatch(name)
        if match is not None and not tag_alive(match.group(1)):
            found.append(directory / name)
    return found


def remove_stale(directory: Path, pattern: str, *, untagged: str | None = None) -> list[Path]:
    """Remove `stale_files(directory, pattern)`, and files matching `untagged` (an older lcrun's names, without a
    tag) untouched for UNTAGGED_STALE_S. Returns what was removed."""
    doomed = stale_files(directory, pattern)
    if untagged is not None:
        regex = re.compile(untagged)
        now = time.time()
        for path in directory.iterdir() if directory.is_dir() else ():
            try:
                if regex.fullmatch(path.name) and now - path.stat().st_mtime > UNTAGGED_STALE_S:
                    doomed.append(path)
            except OSError:
                continue
    removed = []
    for path in doomed:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
        except OSError:
            continue
    return removed
