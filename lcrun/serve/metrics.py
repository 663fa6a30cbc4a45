"""The server's counters and gauges for `/metrics`, kept by prometheus_client in a registry of the server's own (not
the library's global one: two servers in one process, as in the tests, never share a count) and written in
Prometheus' text exposition format 0.0.4 by the library. Counters are bumped from the scheduler thread and the event
loop (prometheus_client's metrics are thread-safe); gauges are read when scraped."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, exposition

# the classic text format, which every Prometheus reads (newer prometheus_client releases default to 1.0.0)
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

_COUNTERS = {
    "prompt_tokens": "Prompt tokens of the requests admitted to a slot.",
    "prompt_tokens_evaluated": "Prompt tokens decoded by llama.cpp (not reused from a cache).",
    "cache_reused_tokens": "Prompt tokens reused from a KV cache: a slot's own, another slot's, or the disk cache.",
    "cache_restored_tokens": "Prompt tokens restored from the disk prompt cache (--cache-dir).",
    "cache_saved_prompts": "Prompt KV states written to the disk prompt cache.",
    "cache_save_failures": "Prompt KV states not saved: the snapshot or the write failed (memory, disk); the "
                           "requests went on.",
    "cache_saves_dropped": "Prompt KV states not taken for the disk prompt cache because its writer was still busy "
                           "with earlier ones.",
    "generated_tokens": "Tokens sampled for replies.",
    "requests_cancelled": "Generations cancelled (the client went away, or the server shut down).",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("lcrun_requests", "HTTP requests answered, by endpoint and status code.",
                                 ["endpoint", "code"], registry=self.registry)
        self._counters = {name: Counter(f"lcrun_{name}", help_text, registry=self.registry)
                          for name, help_text in _COUNTERS.items()}

    def add(self, name: str, value: int = 1) -> None:
        self._counters[name].inc(value)   # an unknown name is a KeyError, as a typo should be

    def request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint=endpoint, code=str(status)).inc()

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        Gauge(f"lcrun_{name}", help_text, registry=self.registry).set_function(read)

    def value(self, name: str) -> int:
        return int(self.registry.get_sample_value(f"lcrun_{name}_total") or 0)

    def render(self) -> str:
        return exposition.generate_latest(self.registry).decode("utf-8")
