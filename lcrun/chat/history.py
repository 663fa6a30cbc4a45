"""The transcript: every finished turn appended to a JSONL file as one write of one line, then fsync — so a crash
(kill -9 included) loses at most the turn in progress, and a torn last line is skipped when reading."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def default_history_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("lcrun")) / "history.jsonl"


class History:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # a torn line left by a crash mid-write must not swallow this record: start on a fresh line
            if os.fstat(fd).st_size and not _ends_with_newline(self.path):
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue  # a line torn by a crash
                if isinstance(record, dict):
                    yield record


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
