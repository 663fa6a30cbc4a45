"""serve's /metrics through prometheus_client: what it writes parses with Prometheus' own text parser, and each
server counts in a registry of its own (two servers in one process, as the tests run them, never share a count)."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lcrun.serve.metrics import CONTENT_TYPE, Metrics


def test_the_exposition_parses_and_each_server_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.add("generated_tokens", 3)
    first.request("/v1/models", 200)
    first.gauge("slots_busy", "Slots holding a request.", lambda: 2)
    families = {family.name: family for family in text_string_to_metric_families(first.render())}
    assert families["lcrun_generated_tokens"].type == "counter"
    assert [s.value for s in families["lcrun_generated_tokens"].samples if s.name.endswith("_total")] == [3]
    [request] = [s for s in families["lcrun_requests"].samples if s.name == "lcrun_requests_total"]
    assert request.labels == {"endpoint": "/v1/models", "code": "200"} and request.value == 1
    assert families["lcrun_slots_busy"].samples[0].value == 2
    assert first.value("generated_tokens") == 3 and second.value("generated_tokens") == 0
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
