"""The results log: JSON lines, the run's identity first, then one line per finished cell. Each line is one
os.write on a file opened O_APPEND, then fsync: a kill leaves at most a torn last line, which readers skip and a
resumed run cuts off before it appends."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import NiahError

RUN_KIND = "lcrun-niah-run"


def read_log(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """(the run's identity or None, the cell records, the byte length of the whole lines)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NiahError(path, f"cannot read the results ({exc.strerror or exc})") from None
    whole = data.rfind(b"\n") + 1  # what follows the last newline is a torn line
    header: dict[str, Any] | None = None
    cells: list[dict[str, Any]] = []
    for number, line in enumerate(data[:whole].splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise NiahError(path, f"line {number} is not JSON (not a results file of lcrun niah?)") from None
        if not isinstance(record, dict):
            raise NiahError(path, f"line {number} is not a JSON object")
        if record.get("kind") == RUN_KIND:
            header = record
        elif header is None:
            raise NiahError(path, "does not start with the run's parameters (not a results file of lcrun niah?)")
        else:
            cells.append(record)
    return header, cells, whole


def _differences(there: dict[str, Any], here: dict[str, Any]) -> list[str]:
    keys = [k for k in here if k != "kind" and there.get(k) != here[k]]
    return [f"{k} {there.get(k)!r} there, {here[k]!r} now" for k in keys]


class ResultsLog:
    """Nothing is written until the first cell finishes: a run that fails while loading leaves no file behind."""

    def __init__(self, path: Path, identity: dict[str, Any], *, resume: bool, force: bool) -> None:
        self.path = path
        self.identity = {"kind": RUN_KIND, **identity}
        self.done: list[dict[str, Any]] = []
        self._keep = 0          # bytes of the existing file to keep (0: start it over)
        self._fd: int | None = None
        if not path.exists():
            return
        if path.is_dir():
            raise NiahError(path, "a folder, not a results file")
        if not resume:
            if not force:
                raise NiahError(path, "results exist already: --resume to continue that run, --force to start over")
            return
        header, cells, whole = read_log(path)
        if header is not None:
            changed = _differences(header, self.identity)
            if changed:
                raise NiahError(path, "results of a different run (" + "; ".join(changed) + "): use another "
                                      "--output, or --force to start over")
            self.done, self._keep = cells, whole

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._fd is None:
            self._fd = self._open()
            if self._keep == 0:
                line = json.dumps(self.identity, ensure_ascii=False) + "\n" + line
        data = line.encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):
            raise NiahError(self.path, f"short write ({written} of {len(data)} bytes; disk full?)")
        os.fsync(self._fd)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.ftruncate(fd, self._keep)  # drops a torn last line, or the whole file when starting over
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
