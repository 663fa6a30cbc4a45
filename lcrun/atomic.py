"""Whole-file writes that a kill or a full disk cannot leave half done: `<name>.partial`, fsync, rename."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import LcrunError


def write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LcrunError(str(path), f"cannot be written ({exc.strerror or exc})") from None
