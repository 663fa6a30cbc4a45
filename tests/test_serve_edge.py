"""The server's edge, as an attacker's browser page or a careless client meets it (issue 20, findings 1, 3, 8 and 9),
on a live uvicorn server on 127.0.0.1 over the fake several-sequence engine: Host names (DNS rebinding), Origin and
CORS, the JSON content type, the body bound, nesting depth, the connection bound, the API keys (several, non-ASCII),
500 bodies that say nothing of the server, and the event loop staying free while a prompt is tokenized. Every
refusal has its negative control: what must still pass does."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from lcrun.serve.server import ServeOptions
from tests.fixtures.fake_engine import FakeEngine
from tests.fixtures.serve_support import LiveServer, http, metrics
from tests.fixtures.serve_support import engine, server  # noqa: F401  (the fake engine behind a live server)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def post(live: LiveServer, body: bytes | dict, headers: dict[str, str] | None = None,
         path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    return http("POST", live.url + path, body, headers)


def raw_request(port: int, head: str, body: bytes = b"", *, timeout: float = 10) -> bytes:
    """Send a request as bytes, read until the server closes or answers whole (for what urllib will not send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


# -- 1. Host -----------------------------------------------------------------------------------------------------------
def test_a_host_that_does_not_name_the_server_is_refused(server: LiveServer) -> None:
    port = server.port
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}",
                 f"localhost.attacker.example:{port}"):
        status, _, body = post(server, CHAT, {"Host": host})
        assert status == 403 and b'"code":"host_not_allowed"' in body, host
        assert http("GET", server.url + "/health", headers={"Host": host})[0] == 403, host
    # negative controls: every name of a loopback server
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", "LOCALHOST.",
                 f"app.localhost:{port}", f"127.0.0.2:{port}"):
        status, _, body = post(server, CHAT, {"Host": host})
        assert status == 200, (host, body)


def test_allowed_host_adds_names(engine: FakeEngine) -> None:
    with LiveServer(engine, ServeOptions(allowed_hosts=("llm.example.com", "*.corp.example"))) as live:
        for host in ("llm.example.com", "llm.example.com:443", "a.corp.example", f"localhost:{live.port}"):
            assert post(live, CHAT, {"Host": host})[0] == 200, host
        for host in ("example.com", "llm.example.com.evil.example", "corp.example.evil"):
            assert post(live, CHAT, {"Host": host})[0] == 403, host


def test_the_host_policy_of_a_server_bound_beyond_loopback() -> None:
    from lcrun.serve.edge import host_policy

    policy = host_policy("gpu-box.lan", loopback=False)
    assert policy.allows("gpu-box.lan:8080") and policy.allows(f"{socket.gethostname()}:8080")
    assert policy.allows("192.168.1.20:8080") and policy.allows("[fe80::1]:8080")   # IP literals cannot rebind
    assert not policy.allows("attacker.example:8080")
    assert not policy.allows("[::1]x") and not policy.allows("localhost:80a")      # not a Host value
    assert host_policy("127.0.0.1", ("*",), loopback=True).allows("anything.example")


# -- 1. Origin, CORS, content type --------------------------------------------------------------------------------------
def test_a_page_elsewhere_can_neither_call_nor_read(server: LiveServer, engine: FakeEngine) -> None:
    # a "simple" request a page may send without a preflight: text/plain, with its Origin
    before = len(engine.decodes)
    status, headers, body = post(server, json.dumps(CHAT).encode(),
                                 {"Origin": "http://attacker.example", "Content-Type": "text/plain"})
    assert status == 403 and b"--cors-origin" in body
    assert "access-control-allow-origin" not in headers
    status, headers, _ = http("GET", server.url + "/v1/models", headers={"Origin": "http://attacker.example"})
    assert status == 403 and "access-control-allow-origin" not in headers
    preflight = http("OPTIONS", server.url + "/v1/chat/completions",
                     headers={"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"})
    assert preflight[0] == 403 and "access-control-allow-origin" not in preflight[1]
    assert len(engine.decodes) == before   # no generation ran


def test_a_json_body_must_say_so(server: LiveServer) -> None:
    data = json.dumps(CHAT).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        status, _, body = post(server, data, {"Content-Type": content_type})
        assert status == 415 and b'"code":"unsupported_media_type"' in body, content_type
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert post(server, data, {"Content-Type": content_type})[0] == 200, content_type
    assert http("GET", server.url + "/health", headers={"Content-Type": "text/plain"})[0] == 200


def test_cors_origin_allows_one_origin_and_answers_its_preflight(engine: FakeEngine) -> None:
    ui = "http://localhost:5173"
    with LiveServer(engine, ServeOptions(cors_origins=(ui,), api_key="sesame")) as live:
        status, headers, _ = http("OPTIONS", live.url + "/v1/chat/completions", headers={
            "Origin": ui, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert status == 204
        assert headers["access-control-allow-origin"] == ui and "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"]
        status, headers, _ = post(live, CHAT, {"Origin": ui, "Authorization": "Bearer sesame"})
        assert status == 200 and headers["access-control-allow-origin"] == ui and headers["vary"] == "Origin"
        status, headers, _ = post(live, CHAT, {"Origin": ui})   # the key is still needed
        assert status == 401 and headers["access-control-allow-origin"] == ui
        status, headers, _ = post(live, CHAT, {"Origin": "http://localhost:5174", "Authorization": "Bearer sesame"})
        assert status == 403 and "access-control-allow-origin" not in headers
        # without an Origin (curl, the OpenAI client): no CORS headers at all
        status, headers, _ = post(live, CHAT, {"Authorization": "Bearer sesame"})
        assert status == 200 and "access-control-allow-origin" not in headers


# -- 3. bounds -----------------------------------------------------------------------------------------------------------
def test_a_body_beyond_max_body_is_refused_before_it_is_read(engine: FakeEngine) -> None:
    with LiveServer(engine, ServeOptions(max_body=4096)) as live:
        started = time.monotonic()
        # a gigabyte announced, none of it sent: answered at once (reading it would wait for ever)
        reply = raw_request(live.port, f"POST /v1/chat/completions HTTP/1.1\nHost: localhost\n"
                                       "Content-Type: application/json\nContent-Length: 1000000000\n")
        assert reply.startswith(b"HTTP/1.1 413") and b'"code":"request_too_large"' in reply
        assert time.monotonic() - started < 5
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        assert post(live, big)[0] == 413
        chunks = json.dumps(big).encode()
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (chunks[:3000], chunks[3000:])) + b"0\r\n\r\n"
        reply = raw_request(live.port, "POST /v1/chat/completions HTTP/1.1\nHost: localhost\n"
                                       "Content-Type: application/json\nTransfer-Encoding: chunked\n", chunked)
        assert reply.startswith(b"HTTP/1.1 413")
        assert post(live, {"messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 2})[0] == 200


def test_the_default_body_bound_holds_a_prompt_that_fills_a_slot(server: LiveServer) -> None:
    from lcrun.serve.server import default_max_body

    n_ctx_slot = server.state.n_ctx_slot
    assert server.state.edge.max_body == default_max_body(n_ctx_slot)
    # the most a slot's prompt can cost in bytes: every character escaped as \\uXXXX
    prompt = json.dumps({"prompt": "é" * (n_ctx_slot - 2), "max_tokens": 1}, ensure_ascii=True).encode()
    status, _, body = post(server, prompt, path="/v1/completions")
    assert status == 200, body
    ids = json.dumps({"prompt": [99999] * (n_ctx_slot - 2), "max_tokens": 1}).encode()
    assert len(ids) < server.state.edge.max_body


def test_json_nested_too_deep_is_a_400_not_a_crash(server: LiveServer) -> None:
    for body in (b"[" * 50_000, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                 b'{"model": "x", "tool_choice": ' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"}"):
        status, _, reply = post(server, body)
        assert status == 400 and b'"code":"invalid_json"' in reply, reply[:200]
    # brackets inside strings are text, not nesting; a tool_choice 20 deep is parsed (and refused as unsupported)
    assert post(server, {"messages": [{"role": "user", "content": "[" * 3000}], "max_tokens": 2})[0] == 200
    nested: object = 1
    for _ in range(20):
        nested = {"a": nested}
    status, _, reply = post(server, {**CHAT, "tools": [nested]})
    assert status == 400 and b'"param":"tools"' in reply
    assert post(server, CHAT)[0] == 200


def test_open_connections_are_bounded(engine: FakeEngine) -> None:
    with LiveServer(engine, ServeOptions(max_connections=3)) as live:
        idle = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(3)]
        try:
            time.sleep(0.3)
            assert http("GET", live.url + "/health")[0] == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert http("GET", live.url + "/health")[0] == 200


def test_tokenizing_a_prompt_leaves_the_event_loop_free(server: LiveServer, engine: FakeEngine) -> None:
    tokenize = engine.tokenize
    entered = threading.Event()

    def slow(text: str, **kw: object) -> list[int]:
        if "slow please" in text:
            entered.set()
            time.sleep(1.5)
        return tokenize(text, **kw)  # type: ignore[arg-type]

    engine.tokenize = slow  # type: ignore[method-assign]
    request = threading.Thread(target=post, args=(server, {"messages": [{"role": "user", "content": "slow please"}],
                                                           "max_tokens": 2}))
    request.start()
    assert entered.wait(10)
    started = time.monotonic()
    assert http("GET", server.url + "/health")[0] == 200
    assert time.monotonic() - started < 1.0   # answered while the short prompt is still being tokenized (1.5 s)
    request.join(30)


# -- 8. 500 bodies -------------------------------------------------------------------------------------------------------
def test_a_500_says_nothing_of_the_server_but_an_id_found_in_its_log(
        server: LiveServer, engine: FakeEngine, caplog: pytest.LogCaptureFixture) -> None:
    secret = "/home/operator/models/secret-finetune.gguf"

    def broken(text: str, **kw: object) -> list[int]:
        raise RuntimeError(f"cannot map {secret}")

    decode = engine.decode

    def failing(feeds: object) -> None:
        raise RuntimeError(f"llama_decode failed in {secret}")

    engine.tokenize = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="lcrun.serve"):
        status, _, body = post(server, CHAT)
        assert status == 500 and secret.encode() not in body and b"RuntimeError" not in body
        ident = json.loads(body)["error"]["message"].split("(id ")[1].split(")")[0]
        assert any(ident in r.getMessage() and secret in (r.exc_text or "") + r.getMessage() for r in caplog.records)
        engine.tokenize = FakeEngine.tokenize.__get__(engine)  # type: ignore[method-assign]
        engine.decode = failing  # type: ignore[method-assign]
        for stream in (False, True):
            status, _, body = post(server, {**CHAT, "stream": stream})
            assert secret.encode() not in body and b"llama_decode" not in body, body
            assert b"internal error (id " in body
        assert any(secret in r.getMessage() for r in caplog.records if "scheduler" in r.getMessage())
    engine.decode = decode  # type: ignore[method-assign]
    assert post(server, CHAT)[0] == 200


# -- 9. API keys ---------------------------------------------------------------------------------------------------------
def asgi_call(app: object, headers: list[tuple[bytes, bytes]], path: str = "/v1/models") -> tuple[int, dict]:
    """One GET through an ASGI app in this thread: (status, the scope the inner app saw)."""
    seen: dict = {}

    async def inner(scope: dict, receive: object, send: object) -> None:
        seen.update(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    app.app = inner  # type: ignore[attr-defined]  # the Edge in front of a stand-in app that shows the scope
    scope = {"type": "http", "method": "GET", "path": path, "headers": [(b"host", b"localhost"), *headers]}
    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    return statuses[0], seen


def test_keys_are_compared_as_bytes_and_each_has_an_identity() -> None:
    from lcrun.serve.edge import Edge, EdgePolicy, host_policy

    edge = Edge(None, EdgePolicy(host_policy("127.0.0.1", loopback=True), api_keys=("clé-1", "second")))  # type: ignore[arg-type]
    status, scope = asgi_call(edge, [(b"authorization", "Bearer clé-1".encode("utf-8"))])
    assert status == 200
    first = scope["state"]["api_key_id"]
    status, scope = asgi_call(edge, [(b"x-api-key", b"second")])
    assert status == 200 and scope["state"]["api_key_id"] not in (first, "second")
    assert len({first, scope["state"]["api_key_id"]}) == 2
    for wrong in (b"Bearer cl\xe9-1", b"Bearer second2", b"Bearer ", "Bearer clé-2".encode()):
        assert asgi_call(edge, [(b"authorization", wrong)])[0] == 401, wrong


def test_several_keys_on_a_live_server(engine: FakeEngine) -> None:
    with LiveServer(engine, ServeOptions(api_key="one", api_keys=("two", "three"))) as live:
        for key in ("one", "two", "three"):
            assert post(live, CHAT, {"Authorization": f"Bearer {key}"})[0] == 200, key
        assert post(live, CHAT, {"Authorization": "Bearer four"})[0] == 401
        assert metrics(live.url, {"X-Api-Key": "two"})['lcrun_requests_total{endpoint="/v1/chat/completions",code="401"}'] == 1


def test_key_options_refuse_what_clients_cannot_send(tmp_path: Path) -> None:
    from tests.fixtures.cli import assert_one_line_error, invoke

    assert_one_line_error(invoke("serve", "demo", "--api-key", "clé", "--dry-run"), "--api-key", "printable ASCII")
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nalpha-key\n\nbeta key\n")
    assert_one_line_error(invoke("serve", "demo", "--api-key-file", str(keys), "--dry-run"), f"{keys}:4")
    keys.write_text("# team keys\nalpha-key\n\nbeta-key\n")
    result = invoke("serve", "demo", "--api-key-file", str(keys), "--host", "0.0.0.0", "--dry-run")
    assert result.exit_code == 0 and "without an API key" not in result.stderr   # negative control
    from lcrun.serve.keys import read_key_file

    assert read_key_file(keys) == ("alpha-key", "beta-key")


def test_ollama_options_are_held_to_the_loops_bounds_and_to_finite_numbers(server: LiveServer) -> None:
    """Bad options are a 400 naming them, never a 500 from the scheduler thread or from float('nan')."""
    url = server.url + "/api/generate"
    base = {"model": "fake-model", "prompt": "x", "raw": True, "stream": False}
    status, _, raw = http("POST", url, {**base, "options": {"num_predict": 2, "stop": ["zz"]}})
    assert status == 200, raw   # the control: options within the bounds
    for options, named in (({"stop": [f"s{i}" for i in range(17)]}, "options.stop"),
                           ({"stop": ["x" * 300]}, "options.stop")):
        status, _, raw = http("POST", url, {**base, "options": options})
        assert status == 400 and named in json.loads(raw)["error"], raw
    for text in ('"temperature": NaN', '"num_ctx": Infinity', '"top_p": -Infinity'):
        body = json.dumps(base)[:-1] + ', "options": {' + text + "}}"
        status, _, raw = http("POST", url, body.encode(), {"Content-Type": "application/json"})
        assert status == 400 and "options." in json.loads(raw)["error"], (text, raw)
    assert metrics(server.url)["lcrun_slots_busy"] == 0
