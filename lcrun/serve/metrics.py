"""The server's counters and gauges, rendered in Prometheus' text exposition format (version 0.0.4) for `/metrics`.
Counters are bumped from the scheduler thread and the event loop; gauges are read when scraped."""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = {
    "prompt_tokens": "Prompt tokens of the requests admitted to a slot.",
    "prompt_tokens_evaluated": "Prompt tokens decoded by llama.cpp (not reused from a cache).",
    "cache_reused_tokens": "Prompt tokens reused from a KV cache: a slot's own, another slot's, or the disk cache.",
    "cache_restored_tokens": "Prompt tokens restored from the disk prompt cache (--cache-dir).",
    "cache_saved_prompts": "Prompt KV states written to the disk prompt cache.",
    "generated_tokens": "Tokens sampled for replies.",
    "requests_cancelled": "Generations cancelled (the client went away, or the server shut down).",
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add(self, name: str, value: int = 1) -> None:
        if name not in _COUNTERS:
            raise KeyError(name)
        with self._lock:
            self._counters[name] += value

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, read)

    def value(self, name: str) -> int:
        with self._lock:
            return self._counters[name]

    def render(self) -> str:
        with self._lock:
            counters, requests = dict(self._counters), dict(self._requests)
        lines = ["# HELP lcrun_requests_total HTTP requests answered, by endpoint and status code.",
                 "# TYPE lcrun_requests_total counter"]
        for (endpoint, status), n in sorted(requests.items()):
            lines.append(f'lcrun_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
        for name, help_text in _COUNTERS.items():
            lines += [f"# HELP lcrun_{name}_total {help_text}", f"# TYPE lcrun_{name}_total counter",
                      f"lcrun_{name}_total {counters.get(name, 0)}"]
        for name, (help_text, read) in self._gauges.items():
            lines += [f"# HELP lcrun_{name} {help_text}", f"# TYPE lcrun_{name} gauge", f"lcrun_{name} {read():g}"]
        return "\n".join(lines) + "\n"
