"""What lcrun keeps per model file in the user data directory (platformdirs; on Linux ~/.local/share/lcrun/): small
JSON files named by the file's fingerprint — the RULER-style suite's measured recall (lcrun.recall_store) and bench's
prefill speed (lcrun.prefill_speed). Written whole or not at all (lcrun.atomic_files); read here, bounded in size,
with one-line errors that say to delete the file and how to make it again."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import LcrunError


def store_dir(name: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("lcrun")) / name


def read_store(path: Path, *, kind: str, max_bytes: int, error: type[LcrunError], redo: str) -> dict[str, Any] | None:
    """The JSON object in `path` if it is a `kind` file; None when there is no file. `redo` ends the errors' advice
    ("delete it, and {redo}")."""
    try:
        if path.stat().st_size > max_bytes:
            raise error(str(path), f"larger than {max_bytes >> 20} MiB: not a {kind} file; delete it")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(str(path), f"cannot be read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError):   # the parser recurses once per nesting level
        raise error(str(path), f"is not JSON: delete it, and {redo}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise error(str(path), f"is not a {kind} file: delete it, and {redo}")
    return data
