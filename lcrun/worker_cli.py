"""`lcrun worker`: offer this machine's devices (GPUs, else the CPU) to an lcrun elsewhere, through ggml's own RPC
server (`ggml_backend_rpc_start_server`: no separate binary to build). The protocol has no authentication and no
encryption, so the worker listens on loopback unless `--host` says otherwise, and then warns. ggml serves one client
at a time and waits on it for ever: `WorkerGuard` (worker_guard.py) drops a client that says nothing or stays idle,
gives up on one that vanished (keepalive), and bounds --cache-dir."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import click

from .param_types import MEMORY

GIB = 1 << 30
_GGML_BANNER = ("Starting RPC server", "  endpoint", "  local cache", "Devices:", "  transport")


@click.command(epilog="""\b
Examples:
  lcrun worker                                   # this machine's GPUs (else its CPU), for an lcrun on this machine
  lcrun worker --host 192.168.1.20 --port 50052  # reachable from the LAN (no authentication: trusted networks only)
  lcrun worker --device CUDA0 --port 50053       # one worker per GPU, as llama.cpp advises
  lcrun worker --idle-timeout 0                  # a worker only you use: never drop an idle client
  lcrun worker --cache-dir ~/.cache/lcrun/rpc --cache-size 32G
\b
Then, on the machine that runs the model:
  lcrun chat model.gguf --rpc 192.168.1.20:50052,192.168.1.21:50052
""")
@click.option("-H", "--host", help="Address to listen on (default 127.0.0.1: this machine only). Any other address "
                                   "is reachable by others, and the RPC protocol has no authentication: a warning says "
                                   "so.")
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option("-d", "--device", "devices", multiple=True, metavar="NAME",
              help="Device(s) to offer, by llama.cpp's name (CUDA0, CPU, …; repeatable or comma-separated). "
                   "Default: every GPU, else the CPU.")
@click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads (default: one per physical core).")
@click.option("-c", "--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep large tensors the client sends here, so that loading the same model again skips sending "
                   "them (ggml's local cache).")
@click.option("--cache-size", type=MEMORY, default="16G", show_default=True, metavar="SIZE",
              help="Bound of --cache-dir (any client can send tensors to it): the least recently used files go first.")
@click.option("--idle-timeout", type=click.FloatRange(0), default=1800, show_default=True, metavar="SECONDS",
              help="Drop a client that has sent and received nothing this long (ggml serves one client at a time: "
                   "an idle one keeps the others out). A client that connects and sends nothing is dropped after "
                   "10 s (or this, if shorter). 0: never. A chat left idle past it ends at its next turn.")
def worker(host: str | None, port: int, devices: tuple[str, ...], threads: int | None,
           cache_dir: Path | None, cache_size: int, idle_timeout: float) -> None:
    """Serve this machine's devices to an lcrun elsewhere (`--rpc HOST:PORT` there) until Ctrl-C."""
    from .engine import rpc
    from .errors import LcrunError
    from .devices import default_threads
    from .net import is_loopback

    rpc.require_rpc("lcrun worker")
    address = _resolve(host or "127.0.0.1")
    endpoint = f"{address}:{port}"
    _check_free(address, port)
    names = [n for value in devices for n in value.replace("/", ",").split(",") if n]
    offered = _offered_devices(names or None)
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LcrunError(str(cache_dir), f"cannot create the cache folder ({exc.strerror})") from None

    out = click.echo
    out(f"lcrun worker · ggml RPC protocol {'.'.join(map(str, rpc.PROTOCOL))}")
    for device in offered:
        out(f"  offers {device.name} ({device.description}): {device.free_bytes / GIB:,.1f} GiB free of "
            f"{device.total_bytes / GIB:,.1f} GiB")
    loopback = is_loopback(address)
    if not loopback:
        click.echo(f"warning: listening on {endpoint}, reachable from other machines. ggml's RPC protocol has no "
                   "authentication and no encryption: anyone who can reach this port can use this machine's "
                   "devices and read what they hold. Use it on a trusted network only.", err=True)
    server = rpc.serve(endpoint, [d.name for d in offered], n_threads=threads or default_threads(),
                       cache_dir=str(cache_dir) if cache_dir else None, on_output=_relay)
    _wait_until_listening(port, server)  # "listening" is said once a client can connect, not before
    from .worker_guard import WorkerGuard

    WorkerGuard(port, idle_timeout_s=idle_timeout, cache_dir=cache_dir, cache_max_bytes=cache_size,
                on_event=lambda line: _relay(line)).start()
    reach = endpoint if address != "0.0.0.0" else f"{socket.gethostname()}:{port}"
    out(f"listening on {endpoint}{' (this machine only)' if loopback else ''}; on the machine that runs the model: "
        f"--rpc {reach}")
    sys.stdout.flush()
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        click.echo("worker stopped")
        sys.stdout.flush()
        os._exit(0)  # ggml's server thread is blocked in accept(): nothing to wait for
    raise LcrunError(endpoint, "ggml's RPC server stopped (see its message above)")


def _offered_devices(names: list[str] | None) -> list:
    """The local devices a worker offers, as lcrun.engine.backends.BackendDevice: the named ones, else (as llama.cpp's
    rpc-server) every GPU, else the CPU."""
    from .engine.backends import list_devices
    from .errors import LcrunError

    found = list_devices()
    if names:
        by_name = {d.name.lower(): d for d in found}
        missing = [n for n in names if n.lower() not in by_name]
        if missing:
            raise LcrunError(f"--device {missing[0]}", "no such device here (this machine has: "
                                                       f"{', '.join(d.name for d in found)})")
        return [by_name[n.lower()] for n in names]
    accelerators = [d for d in found if d.kind not in ("cpu", "accel")]
    return accelerators or [d for d in found if d.kind == "cpu"][:1]


def _relay(line: str) -> None:
    """ggml's server output: its banner repeats what was printed above; each client coming and going is logged."""
    if line.startswith(_GGML_BANNER) or (line.startswith("  ") and " MiB free)" in line):
        return
    stamp = time.strftime("%H:%M:%S")
    if line == "Accepted client connection":
        line = "client connected"
    elif line == "Client connection closed":
        line = "client left"
    click.echo(f"{stamp} {line}")


def _resolve(host: str) -> str:
    """An IPv4 address for ggml's server socket (it takes no names)."""
    from .errors import LcrunError

    try:
        return socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError):
        raise LcrunError(f"--host {host}", "not an IPv4 address or a name of this machine") from None


def _check_free(address: str, port: int) -> None:
    """Refuse a port already taken (or an address not on this machine) before ggml tries and prints its own error."""
    from .errors import LcrunError

    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((address, port))
    except OSError as exc:
        why = ("the port is in use (another worker?); pick another with --port" if exc.errno == 98
               else f"cannot listen there ({exc.strerror})")
        raise LcrunError(f"{address}:{port}", why) from None
    finally:
        probe.close()


def _wait_until_listening(port: int, server: Any, timeout: float = 10.0) -> None:
    """Until this process has a socket listening on `port` (ggml binds it on its own thread), as the kernel says:
    connecting to find out would count as a client."""
    import psutil

    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.is_alive():
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in me.net_connections("tcp")):
            return
        time.sleep(0.02)

