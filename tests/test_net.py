"""lcrun.net.is_loopback, the one judgement of "reachable from this machine only" behind serve's missing-API-key
warning and worker's no-authentication warning (each had its own copy, and they disagreed: worker's said ::1 was not
loopback, serve's that any host starting with "127." was)."""
from __future__ import annotations

import socket

import pytest

from lcrun.net import is_loopback
from tests.fixtures.cli import invoke


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost", " localhost "])
def test_loopback_addresses_and_names(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.1", "fe80::1",
                                  "127.example.invalid", "no-such-host.invalid"])
def test_wildcards_other_addresses_and_unresolvable_names(host: str) -> None:
    assert not is_loopback(host)


def test_a_name_is_loopback_only_if_every_address_is(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"both.test": ["127.0.0.1", "192.168.1.5"], "local.test": ["127.0.0.1", "::1"]}

    def resolve(host: str, *_args: object, **_kw: object) -> list[tuple]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
                for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert is_loopback("local.test") and not is_loopback("both.test")


def test_serve_warns_beyond_loopback_only() -> None:
    for host in ("::1", "localhost"):
        quiet = invoke("serve", "demo", "--dry-run", "--host", host)
        assert quiet.exit_code == 0 and "without an API key" not in quiet.stderr, quiet.stderr
    warned = invoke("serve", "demo", "--dry-run", "--host", "::")
    assert warned.exit_code == 0 and "warning: listening on :: without an API key" in warned.stderr
