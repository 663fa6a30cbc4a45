"""What a request must be before the app looks at it: the checks a browser or a stranger on the network must not get
past, as an ASGI middleware in front of every route.

- `Host` must name this server (DNS rebinding: a page on attacker.example whose name later resolves to 127.0.0.1
  reaches a loopback server with `Host: attacker.example`). Accepted: IP literals (a rebinding page cannot send one),
  `localhost` and `*.localhost`, the name the server was bound to, this machine's name when bound beyond loopback,
  and `--allowed-host` values (`*` turns the check off).
- `Origin`, which browsers send on cross-origin requests, must be one `--cors-origin` allows, else 403: a page
  elsewhere can neither read replies nor spend the model's time. Allowed origins get CORS headers and answered
  preflights; there is no CORS at all without `--cors-origin`.
- POST bodies must say `Content-Type: application/json` (415 otherwise): a page can send `text/plain` without a
  preflight (a "simple" request), never `application/json`.
- The API keys (`Authorization: Bearer KEY` or `X-Api-Key`), compared as bytes in constant time; the matching key's
  identity (a short hash, never the key) goes on the request (`scope["state"]["api_key_id"]`).
- The body is bounded (`--max-body`): a `Content-Length` beyond it is answered 413 before a byte of it is read, a
  chunked body is read only up to it.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .openai_api import APIError

PREFLIGHT_MAX_AGE_S = 600
JSON_TYPES = frozenset({"application/json"})


@dataclass(frozen=True)
class HostPolicy:
    """Which `Host` header values name this server."""
    names: frozenset[str]
    suffixes: tuple[str, ...] = (".localhost",)
    anything: bool = False

    def allows(self, host_header: str | None) -> bool:
        if self.anything or host_header is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(host_header)
        if name is None:
            return False
        if name in self.names or name.endswith(self.suffixes):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-case, without port and trailing dot (`[::1]:8080` → `::1`); None if it is
    not one."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:] if end >= 0 else ""
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        name = value[1:end]
    else:
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return None
    name = name.rstrip(".")
    return name or None


def host_policy(bound: str, allowed: Sequence[str] = (), *, loopback: bool) -> HostPolicy:
    """The names a server bound to `bound` answers to: loopback names when bound to loopback; this machine's name as
    well when reachable from elsewhere; `allowed` (exact names, `*.domain`, or `*` for any)."""
    names = {"localhost", bound.lower().strip("[]").rstrip(".")}
    suffixes = [".localhost"]
    if not loopback:
        names.add(socket.gethostname().lower())
    anything = False
    for value in allowed:
        value = value.strip().lower().rstrip(".")
        if value == "*":
            anything = True
        elif value.startswith("*."):
            suffixes.append(value[1:])
        elif value:
            names.add(host_name(value) or value)
    return HostPolicy(frozenset(names), tuple(suffixes), anything)


def key_id(key: str) -> str:
    """What identifies a key on a request and in logs: never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class EdgePolicy:
    hosts: HostPolicy
    cors_origins: frozenset[str] = frozenset()      # "*": any origin
    api_keys: tuple[str, ...] = ()
    max_body: int = 8 << 20
    public_paths: frozenset[str] = frozenset()       # no key needed (/health, /v1/models, as llama-server)

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin in self.cors_origins


class Edge:
    """The middleware: every check above, then the app with the body already read (within the bound)."""

    def __init__(self, app: ASGIApp, policy: EdgePolicy) -> None:
        self.app = app
        self.policy = policy
        self._keys = [(k.encode("utf-8"), key_id(k)) for k in policy.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy
        headers = _headers(scope)
        if not policy.hosts.allows(headers.get("host")):
            await _refuse(send, APIError(403, "this server does not answer to that Host; start it with "
                                              "--allowed-host NAME to add a name", code="host_not_allowed"))
            return
        origin = headers.get("origin")
        if origin is not None and not policy.origin_allowed(origin):
            await _refuse(send, APIError(403, f"requests from the web page at {origin[:200]} are not allowed; start "
                                              "the server with --cors-origin ORIGIN to allow one",
                                         code="origin_not_allowed"))
            return
        cors = _cors_headers(origin) if origin is not None else []
        if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            await _preflight(send, cors, headers.get("access-control-request-headers"))
            return
        send = _with_headers(send, cors)
        if self._keys and scope["path"] not in policy.public_paths:
            matched = self._match_key(headers)
            if matched is None:
                await _refuse(send, APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer "
                                                  "KEY`", code="invalid_api_key"))
                return
            scope.setdefault("state", {})["api_key_id"] = matched
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media not in JSON_TYPES:
                shown = media or "none"
                await _refuse(send, APIError(415, f"the request body must be JSON, sent with `Content-Type: "
                                                  f"application/json` (it came as {shown[:80]})",
                                             code="unsupported_media_type"))
                return
            body = await _read_body(receive, headers.get("content-length"), policy.max_body)
            if isinstance(body, APIError):
                await _refuse(send, body, close=True)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _match_key(self, headers: dict[str, str]) -> str | None:
        given = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        raw = given.encode("latin-1")  # the header's bytes as sent; keys are compared as their UTF-8 bytes
        matched = None
        for key, ident in self._keys:  # every key, every time: the time taken says nothing about which matched
            if hmac.compare_digest(raw, key) and matched is None:
                matched = ident
        return matched


def _headers(scope: Scope) -> dict[str, str]:
    # the first of a repeated header counts; header bytes are latin-1 by HTTP's definition
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


async def _read_body(receive: Receive, content_length: str | None, limit: int) -> bytes | APIError:
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit:,} bytes "
                              "(--max-body)", code="request_too_large")
    if content_length is not None:
        if not content_length.strip().isdigit():
            return APIError(400, "Content-Length is not a number", code="invalid_request")
        if int(content_length) > limit:
            return too_large
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts)  # the app sees an empty or partial body and the disconnect after it
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # what comes after the body: the client's disconnect

    return replayed


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-expose-headers", b"Retry-After")]


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    if not extra:
        return send

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


async def _preflight(send: Send, cors: list[tuple[bytes, bytes]], requested: str | None) -> None:
    headers = [*cors, (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
               (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()), (b"content-length", b"0")]
    if requested:  # whatever the page's client sends (openai-node adds x-stainless-* headers)
        headers.append((b"access-control-allow-headers", requested[:1000].encode("latin-1")))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send: Send, error: APIError, *, close: bool = False) -> None:
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # a body left unread: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

