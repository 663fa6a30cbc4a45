"""Which model file a saved state belongs to, without reading the file: its identity on disk (device, inode, size,
modification and change times to the nanosecond), from one stat.

Reading the file to hash it costs a minute for a 40 GB model, and hashing a sample of it proves nothing (a fine-tune
that changes only middle layers matches the first and last megabytes). Size and mtime alone are not sound: `cp -p` and
many downloaders give another file the same pair. The inode and the change time are not copied: the kernel sets the
ctime on every write (a user cannot set it short of changing the clock), so another file, or this one rewritten in
place, differs. A copy, a move across filesystems or a chmod changes the identity too: a saved state is then refused
and evaluated again — a prefill, never a wrong state."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_identity(path: Path) -> str:
    """A hex digest of the file's identity on disk; "" if it cannot be read (no file: nothing matches it)."""
    try:
        st = Path(path).resolve().stat()
    except OSError:
        return ""
    fields = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()
