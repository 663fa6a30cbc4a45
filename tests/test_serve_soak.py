"""A bounded soak of `lcrun serve` on loopback: 8 concurrent clients send 200 requests mixing good ones (chat and
completions, streamed and not), malformed JSON, wrong types, over-long prompts and streams dropped mid-reply. Every
answer must be what it should (200 or an OpenAI error object with the right status); afterwards the server still
answers, /metrics shows no busy slot and an empty queue, and its resident memory grew less than 5 %."""
from __future__ import annotations

import http.client as httpclient
import json
import threading
import time
from urllib.parse import urlsplit

import psutil
import pytest

from tests.fixtures.serve_support import ServeProcess, http, metrics, wait_for

CLIENTS = 8
REQUESTS = 200
WARMUP = 40


class Client:
    """One keep-alive connection (a new one after a dropped stream), standard library only."""

    def __init__(self, base: str) -> None:
        self.netloc = urlsplit(base).netloc
        self.conn = httpclient.HTTPConnection(self.netloc, timeout=60)

    def post(self, path: str, body: bytes | dict) -> httpclient.HTTPResponse:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.conn.request("POST", path, data, {"Content-Type": "application/json"})
        return self.conn.getresponse()

    def json(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        r = self.post(path, body)
        return r.status, json.loads(r.read())

    def drop(self) -> None:
        self.conn.close()
        self.conn = httpclient.HTTPConnection(self.netloc, timeout=60)


def one_request(kind: str, client: Client, n_ctx_slot: int) -> str:
    chat = "/v1/chat/completions"
    if kind == "chat":
        status, body = client.json(chat, {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8})
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    elif kind == "stream":
        r = client.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "stream": True})
        assert r.status == 200
        lines = [line for line in r.read().decode().splitlines() if line]
        assert lines[-1] == "data: [DONE]"
    elif kind == "malformed":
        status, body = client.json(chat, b'{"messages": [')
        assert status == 400 and body["error"]["code"] == "invalid_json"
    elif kind == "wrong_type":
        status, body = client.json(chat, {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"})
        assert status == 400 and body["error"]["param"] == "max_tokens"
    elif kind == "too_long":
        status, body = client.json("/v1/completions", {"prompt": "word " * (n_ctx_slot + 50), "max_tokens": 4})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    elif kind == "disconnect":
        r = client.post(chat, {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 400,
                               "stream": True, "ignore_eos": True})
        assert r.status == 200
        for _ in range(4):
            r.readline()
        client.drop()  # gone mid-stream
    return kind


KINDS = ["chat", "stream", "malformed", "wrong_type", "too_long", "disconnect", "chat", "disconnect"]


@pytest.mark.slow
def test_soak_mixed_traffic_leaves_the_server_healthy() -> None:
    with ServeProcess("demo", "--threads", "1", "-np", "2", "--max-queue", "64") as server:
        base = server.url
        status, _, body = http("GET", base + "/v1/models")
        n_ctx_slot = json.loads(body)["data"][0]["meta"]["n_ctx_slot"]
        proc = psutil.Process(server.pid)
        counts: dict[str, int] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()
        started = time.monotonic()

        def run(indices: range) -> None:
            def worker(w: int) -> None:
                client = Client(base)
                try:
                    for i in indices[w::CLIENTS]:
                        try:
                            kind = one_request(KINDS[i % len(KINDS)], client, n_ctx_slot)
                        except BaseException as exc:  # noqa: BLE001 - reported below
                            with lock:
                                errors.append(exc)
                            return
                        with lock:
                            counts[kind] = counts.get(kind, 0) + 1
                finally:
                    client.conn.close()

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)

        run(range(WARMUP))
        assert wait_for(lambda: metrics(base)["lcrun_slots_busy"] == 0, 30)
        rss_before = proc.memory_info().rss
        run(range(WARMUP, REQUESTS))
        assert not errors, errors[:3]
        assert sum(counts.values()) == REQUESTS and set(counts) == set(KINDS)
        assert time.monotonic() - started < 240
        assert wait_for(lambda: metrics(base)["lcrun_slots_busy"] == 0, 30)
        after = metrics(base)
        assert after["lcrun_queue_length"] == 0
        assert after["lcrun_requests_cancelled_total"] >= 1
        assert after['lcrun_requests_total{endpoint="/v1/chat/completions",code="400"}'] > 0
        rss_after = proc.memory_info().rss
        assert rss_after < rss_before * 1.05, (rss_before, rss_after)
        status, _, body = http("POST", base + "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "Still up?"}], "max_tokens": 4})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1
        code, _, err = server.stop()
    assert code == 0, err
