"""Network addresses as the commands that listen (`serve`, `worker`) judge them."""
from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether listening on `host` — an address or a name — is reachable from this machine only: a loopback address
    (127.0.0.0/8, ::1, bracketed or not), or a name whose every address is one ("localhost"). The wildcards
    ("", 0.0.0.0, ::) listen everywhere; a name that does not resolve is not judged safe."""
    text = host.strip().removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        pass
    if not text:
        return False
    try:
        infos = socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    # an IPv6 link-local answer carries its zone ("fe80::1%eth0"), which ip_address does not parse
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in infos)
