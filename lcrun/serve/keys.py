"""API keys as `lcrun serve` takes them: `--api-key` and `--api-key-file` (one key a line). A key must be printable
ASCII: HTTP clients send header values as ASCII (openai-python refuses anything else), so a key outside it could be
set and never be sent."""
from __future__ import annotations

from pathlib import Path

from lcrun.errors import LcrunError

MAX_KEY_FILE_BYTES = 1 << 20


def check_key(key: str, where: str) -> str:
    if not key:
        raise LcrunError(where, "an empty API key")
    bad = next((c for c in key if not " " < c < "\x7f"), None)
    if bad is not None:
        raise LcrunError(where, f"API keys must be printable ASCII without spaces (this one has {bad!r}): HTTP "
                                "clients send only ASCII in headers")
    return key


def read_key_file(path: Path) -> tuple[str, ...]:
    """The keys in `path`, one a line; blank lines and `#` comments skipped."""
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise LcrunError(str(path), f"larger than {MAX_KEY_FILE_BYTES >> 20} MiB: not a key file")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise LcrunError(str(path), "no such file") from None
    except OSError as exc:
        raise LcrunError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise LcrunError(str(path), "not a text file of keys") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(check_key(line, f"{path}:{number}"))
    if not keys:
        raise LcrunError(str(path), "no keys in it (one key a line)")
    return tuple(keys)
