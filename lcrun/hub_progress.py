"""Download progress from huggingface_hub as a `(done, total)` callback: a tqdm stand-in that renders nothing.
No huggingface_hub here (lcrun.hub hands the class to it)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def forwarding_bar_class(progress: Callable[[int, int], None] | None, *, total: int, initial: int) -> type | None:
    """A tqdm stand-in for snapshot_download that renders nothing and forwards bytes to `progress`.

    snapshot_download makes a files bar and two byte bars (bytes received, bytes written); both byte bars see
    every byte of a plain HTTP download, so the larger of the two is the bytes done.
    """
    if progress is None:
        return None
    lock = threading.Lock()
    byte_counts: list[list[int]] = []

    def report() -> None:
        done = initial + max((count[0] for count in byte_counts), default=0)
        progress(min(done, total) if total else done, total or done)

    class ForwardingBar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n = kwargs.get("initial") or 0
            self.total = kwargs.get("total")
            self.format_dict: dict[str, Any] = {"rate": None}
            self._count: list[int] | None = None
            if kwargs.get("unit") == "B":
                self._count = [0]
                with lock:
                    byte_counts.append(self._count)

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0
            if self._count is not None and n:
                with lock:
                    self._count[0] += int(n)
                    report()

        def __enter__(self) -> ForwardingBar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def __getattr__(self, name: str) -> Callable[..., None]:
            # close, refresh, set_description, set_postfix_str, ...: nothing to render
            return lambda *args, **kwargs: None

    return ForwardingBar
