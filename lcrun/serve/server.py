"""Serving an engine: the scheduler, the optional disk prompt cache, the app, and uvicorn on a socket bound here (so a
busy port is a one-line error, and port 0 picks a free one). Ctrl-C or SIGTERM stops accepting connections, lets the
replies in flight finish for a grace period, ends the rest with an error event, and returns 0."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from lcrun.chat.formats import FormatChoice, engine_renderer
from lcrun.chat.template import ChatRenderer
from lcrun.engine.protocol import EngineProtocol
from lcrun.errors import LcrunError
from lcrun.net import is_loopback

from .app import PUBLIC_PATHS, ServerState, create_app
from .edge import EdgePolicy, host_policy
from .metrics import Metrics
from .openai_api import unavailable
from .prompt_cache import PromptCache, model_fingerprint
from .scheduler import Scheduler


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()          # --api-key-file's, beside api_key
    allowed_hosts: tuple[str, ...] = ()     # Host names beyond the bound address's (edge.host_policy)
    cors_origins: tuple[str, ...] = ()      # origins whose pages may call the API (none: no CORS)
    max_body: int | None = None             # request body bound in bytes; None: default_max_body(n_ctx_slot)
    max_connections: int = 256              # open connections; more are answered 503 by uvicorn
    max_queue: int = 64
    cache_dir: Path | None = None
    cache_max_bytes: int = 8 << 30
    cache_min_tokens: int = 1024
    shutdown_grace_s: float = 5.0
    verbose: bool = False


def default_max_body(n_ctx_slot: int) -> int:
    """Room for the longest prompt a slot holds, however it is spelled (text escaped as JSON \\uXXXX runs to about
    24 bytes a token; token ids to 8), and 4 MiB beside it for the rest of the request."""
    return n_ctx_slot * 24 + (4 << 20)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise LcrunError(f"{host}:{port}", f"cannot listen there ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise LcrunError(f"{host}:{port}", f"cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def prepare(engine: EngineProtocol, options: ServeOptions, *, model_id: str, aliases: tuple[str, ...] = (),
            fingerprint: str | None = None, template: ChatRenderer | None = None,
            chat_format: FormatChoice | None = None) -> ServerState:
    """Everything but the socket: metrics, the disk cache, the scheduler (not started) and the app's state."""
    config = engine.config
    if fingerprint is None:  # the installed llama-cpp-python's version in it, not the one lcrun pins
        fingerprint = model_fingerprint(Path(config.model_path), type_k=config.type_k, type_v=config.type_v,
                                        flash_attn=config.flash_attn, rope_freq_base=config.rope_freq_base,
                                        rope_freq_scale=config.rope_freq_scale)
    metrics = Metrics()
    cache = None
    if options.cache_dir is not None:
        cache = PromptCache(options.cache_dir, fingerprint, max_bytes=options.cache_max_bytes,
                            min_tokens=options.cache_min_tokens)
    scheduler = Scheduler(engine, metrics=metrics, max_queue=options.max_queue, prompt_cache=cache)
    metrics.gauge("slots_total", "Slots (parallel sequences) in the context.", lambda: len(scheduler.slots))
    metrics.gauge("slots_busy", "Slots holding a request.", lambda: scheduler.busy_slots)
    metrics.gauge("queue_length", "Requests waiting for a free slot.", lambda: scheduler.queue_length)
    metrics.gauge("kv_cells_used", "KV cache cells holding some slot's tokens.", lambda: scheduler.kv_cells_used)
    metrics.gauge("kv_cells_total", "KV cache cells in the context.", lambda: engine.n_ctx)
    if cache is not None:
        metrics.gauge("prompt_cache_bytes", "Bytes in the disk prompt cache.", cache.total_bytes)
        metrics.gauge("prompt_cache_files", "Prompt states in the disk prompt cache.", lambda: len(cache))
    if template is None:  # the format chosen from the file's header, else from the loaded vocabulary (as chat does)
        template = engine_renderer(engine, chat_format)
    from lcrun import __version__

    edge = EdgePolicy(host_policy(options.host, options.allowed_hosts, loopback=is_loopback(options.host)),
                      cors_origins=frozenset(options.cors_origins),
                      api_keys=tuple(k for k in (options.api_key, *options.api_keys) if k),
                      max_body=options.max_body or default_max_body(scheduler.n_ctx_slot), public_paths=PUBLIC_PATHS)
    return ServerState(engine=engine, scheduler=scheduler, metrics=metrics, model_id=model_id, template=template,
                       fingerprint=f"lcrun-{__version__}-{fingerprint[:8]}", aliases=aliases,
                       edge=edge, created=int(time.time()),
                       meta={"n_ctx": engine.n_ctx, "n_ctx_slot": scheduler.n_ctx_slot, "slots": len(scheduler.slots),
                             "n_ctx_train": engine.n_ctx_train})


def serve(state: ServerState, sock: socket.socket, options: ServeOptions,
          on_ready: Callable[[], None] | None = None) -> int:
    """Run until Ctrl-C or SIGTERM (or `stop` of the returned server in tests); 0 on a clean stop. A worker that goes
    away mid-run ends the process with status 1 once every request in flight has its answer (`_answer_then_exit`)."""
    server = make_server(state, options)
    if any(name.startswith("RPC") for name in state.engine.config.devices or ()):
        from lcrun.engine import rpc

        rpc.on_worker_lost(lambda problem: _answer_then_exit(state, server, options, problem))
    state.scheduler.start()
    try:
        if on_ready is not None:
            on_ready()
        server.run(sockets=[sock])
    finally:
        if state.scheduler.abandoned:  # its thread is held in ggml: no join, no llama.cpp teardown over a dead link
            sys.stderr.flush()
            os._exit(1)
        state.scheduler.close(options.shutdown_grace_s)
        sock.close()
    return 0


def _answer_then_exit(state: ServerState, server: Server, options: ServeOptions, problem: str) -> None:
    """ggml lost a worker: its layers (and KV cells) are gone, so no request can go on. Say so in one line, answer
    every accepted request (503, `worker_lost`), refuse new ones, let uvicorn send the answers and stop; the process
    ends with status 1 then, or after a grace period if some connection lingers."""
    os.write(2, f"error: {problem}; the requests in flight were answered 503 and the server stops\n".encode())
    state.scheduler.abandon(unavailable(f"the server lost a worker ({problem.partition(' (')[0]}); it is stopping, "
                                        "retry once it is restarted", code="worker_lost"))
    server.stop()
    last_resort = threading.Timer(options.shutdown_grace_s + 10, lambda: os._exit(1))
    last_resort.daemon = True
    last_resort.start()


def make_server(state: ServerState, options: ServeOptions) -> Server:
    # limit_concurrency: connections (and their requests) beyond it are answered 503 at once, before any parsing
    config = uvicorn.Config(create_app(state), log_level="info" if options.verbose else "warning",
                            access_log=options.verbose, lifespan="off", limit_concurrency=options.max_connections,
                            timeout_graceful_shutdown=int(options.shutdown_grace_s) + 5)
    return Server(config, on_exit=lambda: state.scheduler.begin_close(options.shutdown_grace_s))


class Server(uvicorn.Server):
    """uvicorn's server that tells the scheduler to wind down on the first signal and does not re-raise the signal
    once stopped (a server asked to stop has done its job: exit status 0). A second Ctrl-C stops at once."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.stop()

    def stop(self) -> None:
        if not self.should_exit:
            self.on_exit()
        self.should_exit = True
