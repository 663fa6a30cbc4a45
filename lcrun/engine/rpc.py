"""ggml's RPC backend, as llama-cpp-python 0.3.36 vendors it (ggml/include/ggml-rpc.h): serve this machine's devices
to an lcrun elsewhere (`serve`), and use the devices of workers elsewhere (`probe`, `worker_memory`, `device_handle`).

Everything goes through ggml's own functions except the handshake: ggml aborts the process when a server is
unreachable, speaks another protocol version or is busy with another client (it serves one at a time), so `probe`
performs the same HELLO in Python first, with timeouts, and turns each of those into a one-line `WorkerError`. A
worker lost later (mid-generation) also ends in ggml's abort; `watch_workers` installs ggml's abort callback, which
names the worker that went away in one line and exits. ggml's functions come from lcrun's one bindings table
(engine/bindings.py), through libllama's handle.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lcrun.errors import LcrunError

from .bindings import ABORT_CALLBACK, ggml

# ggml-rpc.h of the vendored llama.cpp: the client accepts a server of the same major and a minor not above its own
PROTOCOL = (7, 0, 0)
DEFAULT_PORT = 50052
_CMD_HELLO = 14
_HELLO_CAPS = 24            # rpc_msg_hello_req: transport capabilities, zero for plain TCP
_MAX_HELLO_REPLY = 4096
REBUILD_COMMAND = ('CMAKE_ARGS="-DGGML_RPC=on" .venv/bin/pip install --force-reinstall --no-deps --no-cache-dir '
                   'llama-cpp-python==0.3.36')


class WorkerError(LcrunError):
    """A worker cannot be used: unreachable, busy, of another protocol version. `str()` names the endpoint."""


class RpcUnavailable(LcrunError):
    """This llama-cpp-python was built without ggml's RPC backend."""


def rpc_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def require_rpc(what: str) -> None:
    if not rpc_supported():
        raise RpcUnavailable(what, "this llama-cpp-python was built without ggml's RPC backend; rebuild it with "
                                   f"RPC on: {REBUILD_COMMAND}")


# -- endpoints ----------------------------------------------------------------------------------------------------
def parse_endpoint(text: str) -> str:
    """HOST:PORT as ggml takes it (IPv4 or a name; the port defaults to 50052, rpc-server's). Raises ValueError."""
    value = text.strip()
    if not value:
        raise ValueError("an empty worker address (expected HOST:PORT)")
    if value.startswith("[") or value.count(":") > 1:
        raise ValueError(f"{value!r}: ggml's RPC backend takes IPv4 addresses and host names, not IPv6")
    host, sep, port_text = value.partition(":")
    if not host:
        raise ValueError(f"{value!r} has no host (expected HOST:PORT)")
    port = DEFAULT_PORT
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return f"{host}:{port}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


# -- the handshake, in Python ----------------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def probe(endpoint: str, *, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect to a worker and exchange ggml's HELLO: its protocol version, or a WorkerError saying why not."""
    host, port = split_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        raise WorkerError(endpoint, f"unknown host {host!r}") from None
    except ConnectionRefusedError:
        raise WorkerError(endpoint, "connection refused: no `lcrun worker` listens there (start one with "
                                    f"`lcrun worker --port {port}` on that machine)") from None
    except TimeoutError:
        raise WorkerError(endpoint, f"no answer within {timeout:g} s (is the machine up, and the port open?)") from None
    except OSError as exc:
        raise WorkerError(endpoint, f"cannot connect ({exc.strerror or exc})") from None
    with sock:
        try:
            sock.sendall(bytes([_CMD_HELLO]) + struct.pack("<Q", _HELLO_CAPS) + bytes(_HELLO_CAPS))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if not 3 <= size <= _MAX_HELLO_REPLY:
                raise EOFError
            reply = _recv_exact(sock, size)
        except TimeoutError:
            raise WorkerError(endpoint, f"connected, but no handshake within {timeout:g} s: the worker is serving "
                                        "another client (a worker takes one client at a time)") from None
        except (EOFError, ConnectionError):
            raise WorkerError(endpoint, "closed the connection during the handshake: not a ggml RPC server of "
                                        f"protocol {_version(PROTOCOL)} (run the same llama-cpp-python, 0.3.36, "
                                        "on both machines)") from None
    version = (reply[0], reply[1], reply[2])
    if version[0] != PROTOCOL[0] or version[1] > PROTOCOL[1]:
        raise WorkerError(endpoint, f"speaks RPC protocol {_version(version)}, this lcrun {_version(PROTOCOL)}: "
                                    "run the same llama-cpp-python (0.3.36) on both machines")
    return version


def _version(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


# -- ggml's client: devices and their memory -----------------------------------------------------------------------
_backend_ready = False


def _lib() -> Any:
    """ggml's functions (lcrun's one bindings table), the backend initialised."""
    global _backend_ready
    if not _backend_ready:
        import llama_cpp

        llama_cpp.llama_backend_init()
        _backend_ready = True
    return ggml


@dataclass(frozen=True)
class WorkerDevice:
    endpoint: str
    index: int              # the device's number on its worker
    free_bytes: int
    total_bytes: int

    @property
    def name(self) -> str:
        """llama.cpp's name for the device's buffers ("RPC0[host:port]"), which is also what EngineConfig.devices
        takes for it."""
        return device_name(self.endpoint, self.index)


def device_name(endpoint: str, index: int) -> str:
    return f"RPC{index}[{endpoint}]"


def endpoint_of(device: str) -> str | None:
    """The worker endpoint of a device name from `device_name`; None for a local device."""
    if device.startswith("RPC") and device.endswith("]") and "[" in device:
        return device[:-1].partition("[")[2]
    return None


def worker_memory(endpoint: str) -> list[WorkerDevice]:
    """The devices a worker offers and their memory, asked over RPC (ggml_backend_rpc_get_device_memory). Probe first:
    ggml aborts on a worker it cannot reach."""
    lib = _lib()
    reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
    devices = []
    for index in range(lib.ggml_backend_reg_dev_count(reg)):
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_rpc_get_device_memory(endpoint.encode(), index, ctypes.byref(free), ctypes.byref(total))
        devices.append(WorkerDevice(endpoint, index, free.value, total.value))
    return devices


def device_handle(name: str) -> int | None:
    """The ggml device behind a worker device name ("RPC0[host:port]"), None for other names. The worker must have
    been probed: ggml connects to it here. From then on, losing it ends the process with one line (watch_workers)."""
    if not (name.startswith("RPC") and name.endswith("]") and "[" in name):
        return None
    index_text, _, endpoint = name[3:-1].partition("[")
    if not index_text.isdigit():
        return None
    lib = _lib()
    reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
    if int(index_text) >= lib.ggml_backend_reg_dev_count(reg):
        raise WorkerError(endpoint, f"offers {lib.ggml_backend_reg_dev_count(reg)} device(s), no device "
                                    f"{index_text}")
    watch_workers([endpoint])
    return lib.ggml_backend_reg_dev_get(reg, int(index_text))


# -- a worker lost mid-run -----------------------------------------------------------------------------------------
# ggml sets no timeout on its connections: a worker whose machine goes away without closing them (power, network,
# sleep) would leave the run waiting forever. Keepalive probes and a user timeout make the kernel give such a
# connection up after about half a minute; ggml then aborts, and `watch_workers` names the worker in one line.
KEEPALIVE_IDLE_S = 10        # a connection quiet this long is probed (a worker busy computing still answers probes)
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3
USER_TIMEOUT_S = 30          # data sent and not acknowledged this long ends the connection


def set_keepalive(sock: socket.socket) -> None:
    """Keepalive probes and the user timeout above on one TCP connection (both ends use them: the run's connections
    to its workers, a worker's to its client); OSError where the platform refuses an option."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_S * 1000)


def keep_alive(endpoints: list[str]) -> int:
    """Turn on TCP keepalive and a user timeout on this process's connections to `endpoints` (ggml's, found among
    the open file descriptors; Linux only) and return how many were set."""
    if not os.path.isdir("/proc/self/fd") or not hasattr(socket, "TCP_KEEPIDLE"):
        return 0
    wanted = set()
    for endpoint in endpoints:
        host, port = split_endpoint(endpoint)
        try:
            wanted |= {(info[4][0], port) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError:
            continue
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))  # a duplicate: options set on it are the connection's
        except (OSError, ValueError):
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or tuple(sock.getpeername()[:2]) not in wanted:
                    continue
                set_keepalive(sock)
            except OSError:
                continue
            count += 1
    return count

_watched: list[str] = []
_LOSS_NOTE = "the turn in progress is lost; finished chat turns (the transcript) and niah cells (the results file) are kept"
_callback_keepalive: list[Any] = []
_on_lost: list[Callable[[str], None]] = []


def on_worker_lost(handler: Callable[[str], None]) -> None:
    """Instead of ending the process at once when a worker goes away, call `handler(problem)` on the thread ggml
    aborts in, and hold that thread there for good (returning would let ggml abort): the handler answers what it
    must (serve: every request in flight) and ends the process itself."""
    _on_lost[:] = [handler]


def watch_workers(endpoints: list[str]) -> None:
    """From now on, ggml's abort (how its RPC client fails when a worker goes away) prints one line naming the worker
    that went away and ends the process with status 1, instead of a C backtrace."""
    lib = _lib()
    for endpoint in endpoints:
        if endpoint not in _watched:
            _watched.append(endpoint)
    if _callback_keepalive:
        return
    callback = ABORT_CALLBACK(_on_abort)
    _callback_keepalive.append(callback)
    lib.ggml_set_abort_callback(callback)


def gone_workers(endpoints: list[str], *, timeout: float = 1.0, attempts: int = 20) -> list[str]:
    """The endpoints that no longer accept a connection. A worker's process closes its sockets one by one as it
    dies, so the one this client used can be gone a moment before the one it listens on: look again for a while."""
    for attempt in range(attempts):
        gone = []
        for endpoint in endpoints:
            try:
                socket.create_connection(split_endpoint(endpoint), timeout=timeout).close()
            except OSError:
                gone.append(endpoint)
        if gone:
            return gone
        time.sleep(0.05)
    return []


def _on_abort(message: bytes | None) -> None:
    # Runs on whichever thread ggml aborts in (often its RPC dispatcher thread). Never returns for a lost worker.
    text = (message or b"").decode("utf-8", errors="replace").strip()
    if not _watched:
        sys.stderr.write(f"{text}\n")
        sys.stderr.flush()
        return  # ggml aborts, as it would have
    named = [endpoint for endpoint in _watched if endpoint in text]
    gone = named or gone_workers(_watched)
    if gone:
        line = (f"error: worker {', '.join(gone)} went away (its connection closed or stopped answering mid-run); "
                f"{_LOSS_NOTE}\n")
    else:
        line = f"error: a worker stopped answering ({', '.join(_watched)}: {text.rpartition(': ')[2]}); " \
               f"{_LOSS_NOTE}\n"
    if _on_lost:
        try:
            _on_lost[0](line.removeprefix("error: ").removesuffix(f"; {_LOSS_NOTE}\n"))
        finally:
            threading.Event().wait()
    if sys.stderr.isatty():
        line = "\x1b[?25h\n" + line  # a live display may have hidden the cursor
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    os.write(2, line.encode("utf-8", errors="replace"))
    os._exit(1)


# -- the worker side -------------------------------------------------------------------------------------------------
def serve(endpoint: str, device_names: list[str], *, n_threads: int, cache_dir: str | None,
          on_output: Callable[[str], None]) -> threading.Thread:
    """Start ggml's RPC server for these local devices on a daemon thread (it accepts one client at a time, forever)
    and return the thread; it ends only when the server cannot start. ggml's own output (a banner, then a line per
    client connecting and leaving) is captured from file descriptor 1 and handed to `on_output` line by line."""
    lib = _lib()
    handles = []
    for name in device_names:
        dev = lib.ggml_backend_dev_by_name(name.encode())
        if not dev:
            raise LcrunError(name, "no such device")
        handles.append(dev)
    devices = (ctypes.c_void_p * len(handles))(*handles)
    lines = _capture_stdout()

    def run() -> None:
        lib.ggml_backend_rpc_start_server(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads,
                                          len(handles), devices)

    def relay() -> None:
        for line in lines:
            on_output(line)

    threading.Thread(target=relay, name="ggml-output", daemon=True).start()
    server = threading.Thread(target=run, name="ggml-rpc-server", daemon=True)
    server.start()
    return server


def _capture_stdout() -> Iterator[str]:
    """Point file descriptor 1 (where ggml's printf writes) at a pipe and yield what arrives there, line by line;
    Python's sys.stdout keeps writing to the original destination."""
    sys.stdout.flush()
    original = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    sys.stdout = open(original, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",  # noqa: SIM115
                      errors="replace", closefd=True)

    def lines() -> Iterator[str]:
        with open(read_end, "r", encoding="utf-8", errors="replace") as pipe:
            yield from (line.rstrip("\n") for line in pipe)

    return lines()
