"""The worker's side of its connections, which ggml's RPC server leaves unguarded: it serves one client at a time and
waits on it without a timeout, so a client that connects and says nothing, goes quiet, or vanishes without closing
(a half-open connection) would keep every other client out for ever; and with `--cache-dir` it writes whatever large
tensors any client sends into that directory, without a bound.

`WorkerGuard` is a thread beside ggml's server that looks at the server's client connections among this process's
sockets (Linux: /proc/self/fd) every `interval_s`:
- each new one gets TCP keepalive and a user timeout (a peer gone without a word is given up in about half a minute);
- one that has sent nothing `hello_timeout_s` after connecting, or that has neither sent nor received anything for
  `idle_timeout_s`, is shut down (ggml then closes it and accepts the next client), as the kernel's TCP_INFO says;
- the cache directory is kept under `cache_max_bytes`, least recently used files first.
An idle timeout longer than any one computation a client asks for is safe: a worker computing sends nothing, but its
client waits for it then (the timeout is for connections nobody uses)."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .engine.rpc import set_keepalive

HELLO_TIMEOUT_S = 10.0
# struct tcp_info (linux/tcp.h): offsets of tcpi_last_data_sent, tcpi_last_data_recv (u32, ms ago) and
# tcpi_bytes_received (u64, Linux 4.1+)
_LAST_SENT, _LAST_RECV, _BYTES_RECEIVED, _TCP_INFO_SIZE = 44, 52, 128, 136


class WorkerGuard(threading.Thread):
    def __init__(self, port: int, *, idle_timeout_s: float, hello_timeout_s: float = HELLO_TIMEOUT_S,
                 cache_dir: Path | None = None, cache_max_bytes: int | None = None, interval_s: float = 0.5,
                 on_event: Callable[[str], None] = lambda _: None) -> None:
        super().__init__(name="lcrun-worker-guard", daemon=True)
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.hello_timeout_s = min(hello_timeout_s, idle_timeout_s) if idle_timeout_s > 0 else 0.0
        self.cache_dir = cache_dir
        self.cache_max_bytes = cache_max_bytes
        self.interval_s = interval_s
        self.on_event = on_event
        self._seen: dict[str, float] = {}     # socket inode → when first seen
        self._stop = threading.Event()
        self._last_cache_check = 0.0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_connections()
                if self.cache_dir is not None and self.cache_max_bytes is not None and \
                        time.monotonic() - self._last_cache_check > 2.0:
                    self._last_cache_check = time.monotonic()
                    bound_directory(self.cache_dir, self.cache_max_bytes, self.on_event)
            except Exception as exc:  # noqa: BLE001 - the guard must not die of one odd socket
                self.on_event(f"guard: {exc}")

    def check_connections(self) -> None:
        now = time.monotonic()
        alive: set[str] = set()
        for inode, sock in _client_sockets(self.port):
            with sock:
                alive.add(inode)
                first = self._seen.get(inode)
                if first is None:
                    self._seen[inode] = first = now
                    _keep_alive(sock)
                why = self._why_drop(sock, now - first)
                if why is not None:
                    try:
                        peer = "%s:%s" % sock.getpeername()[:2]
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        continue
                    self.on_event(f"dropped client {peer}: {why}")
        for gone in set(self._seen) - alive:
            del self._seen[gone]

    def _why_drop(self, sock: socket.socket, age_s: float) -> str | None:
        if self.idle_timeout_s <= 0:
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        if len(info) < _TCP_INFO_SIZE:
            return None
        (last_sent,) = struct.unpack_from("<I", info, _LAST_SENT)
        (last_recv,) = struct.unpack_from("<I", info, _LAST_RECV)
        (received,) = struct.unpack_from("<Q", info, _BYTES_RECEIVED)
        if received == 0 and age_s >= self.hello_timeout_s:
            return f"sent nothing in {self.hello_timeout_s:g} s after connecting"
        if min(last_sent, last_recv) / 1000 >= self.idle_timeout_s and age_s >= self.idle_timeout_s:
            return f"idle for {self.idle_timeout_s:g} s (--idle-timeout)"
        return None


def _client_sockets(port: int) -> list[tuple[str, socket.socket]]:
    """This process's TCP connections whose local port is `port` (ggml's server's clients), as duplicates: options
    set and a shutdown done on them are the connection's."""
    found = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getsockname()[1] == port:
                sock.getpeername()  # the listening socket has none
                found.append((target, sock))
                continue
        except OSError:
            pass
        sock.close()
    return found


def _keep_alive(sock: socket.socket) -> None:
    try:
        set_keepalive(sock)
    except OSError:
        pass


def bound_directory(directory: Path, max_bytes: int, on_event: Callable[[str], None] = lambda _: None) -> int:
    """Remove the least recently used files of `directory` (ggml's tensor cache: one file per tensor, by hash) until
    it holds at most `max_bytes`; the bytes left."""
    files = []
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.is_file(follow_symlinks=False):
            files.append((max(st.st_atime, st.st_mtime), st.st_size, Path(entry.path)))
            total += st.st_size
    files.sort()
    removed = 0
    for _, size, path in files:
        if total <= max_bytes:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
    if removed:
        on_event(f"cache: removed {removed} least recently used file(s) to stay under the --cache-size bound")
    return total
