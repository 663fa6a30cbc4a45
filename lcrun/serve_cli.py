"""`lcrun serve`: decide the launch as `lcrun chat` does (for N slots sharing one context), open the model, and serve
the OpenAI API."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli_options import PARALLEL, chat_template_options, launch_options
from .param_types import MEMORY

if TYPE_CHECKING:
    from .launch.options import LaunchOptions


@click.command(epilog="""\b
Examples:
  lcrun serve demo                                           # the built-in tiny model on http://127.0.0.1:8080/v1
  lcrun serve Llama-3.1-8B-Instruct-Q4_K_M.gguf --ctx 64k -np 4   # 4 slots of 16K tokens each
  lcrun serve model.gguf --cache-dir ~/.cache/lcrun/prompts  # long prompts' KV kept on disk across restarts
  LCRUN_API_KEY=secret lcrun serve model.gguf --host 0.0.0.0
  lcrun serve model.gguf --api-key-file keys.txt --allowed-host llm.example.com   # behind a reverse proxy
  lcrun serve model.gguf --cors-origin http://localhost:5173  # a web UI in a browser may call the API
""")
@click.argument("model")
@launch_options()
@chat_template_options
@PARALLEL
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: a free one).")
@click.option("--api-key", envvar="LCRUN_API_KEY", metavar="KEY",
              help="Require `Authorization: Bearer KEY` (default: $LCRUN_API_KEY; /health and /v1/models stay open).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Accept any of the keys in FILE (one per line; blank lines and lines starting with # skipped), "
                   "beside --api-key. Keys are printable ASCII.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header is NAME (repeatable; `*.example.com` for its subdomains, "
                   "`*` for any). By default only the bound address, loopback names and IP addresses are answered, "
                   "which defeats DNS rebinding; add the name a reverse proxy or your clients use.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. http://localhost:5173; repeatable; `*` for any) call the API "
                   "from a browser. Default: none, and requests carrying another Origin are refused (403).")
@click.option("--max-body", type=MEMORY, metavar="SIZE",
              help="Largest request body (default: room for a prompt that fills a slot, plus 4M); larger ones are "
                   "answered 413 unread.")
@click.option("--max-connections", type=click.IntRange(1), default=256, show_default=True, metavar="N",
              help="Open connections at once; more are answered 503 (uvicorn's limit_concurrency).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the KV state of long prompts here, reused by later requests that start with the same "
                   "tokens — also after a restart.")
@click.option("--cache-size", type=MEMORY, default="8G", show_default=True, metavar="SIZE",
              help="Bound of --cache-dir; the least recently used prompts go first.")
@click.option("--cache-min-tokens", type=click.IntRange(256), default=1024, show_default=True, metavar="N",
              help="Prompts shorter than this are not saved to --cache-dir.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True, metavar="N",
              help="Requests that may wait for a free slot; more are answered 503 with Retry-After. 0: none wait "
                   "(503 whenever every slot is busy), e.g. behind a load balancer that retries elsewhere: "
                   "--max-queue 0.")
@click.option("-tb", "--threads-batch", type=click.IntRange(1), metavar="N",
              help="CPU threads for prompt batches (default: every CPU, as llama.cpp's own default).")
@click.option("-a", "--alias", metavar="NAME", help="The model's id in the API (default: the GGUF's file name).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request (uvicorn's access log).")
@click.option("--dry-run", is_flag=True, help="Show the plan and exit without loading the model.")
def serve(launch: LaunchOptions, host: str, port: int, api_key: str | None, api_key_file: Path | None,
          allowed_hosts: tuple[str, ...], cors_origins: tuple[str, ...], max_body: int | None, max_connections: int,
          cache_dir: Path | None, cache_size: int, cache_min_tokens: int, max_queue: int, alias: str | None,
          verbose: bool, dry_run: bool) -> None:
    """Serve MODEL (a GGUF file, `demo`, or a Hub GGUF repo) over an OpenAI-compatible HTTP API.

    /v1/chat/completions and /v1/completions (streamed or not), /v1/models, /health and /metrics (Prometheus).
    The slots are decoded together in one batch per step (continuous batching); a request reuses the longest
    prefix of its prompt that any slot holds in its KV cache.
    """
    from .launch.decide import decide_launch
    from .launch.loaded import open_model
    from .net import is_loopback
    from .serve.keys import check_key, read_key_file
    from .serve.server import ServeOptions, bind, prepare
    from .serve.server import serve as run_server
    from .ui.console import make_console
    from .ui.launch_view import render_launch, render_slots
    from .ui.model_loading import download_progress, loading_status

    if api_key:
        check_key(api_key, "--api-key")
    file_keys = read_key_file(api_key_file) if api_key_file is not None else ()
    out, err = make_console(), make_console(stderr=True)
    with download_progress(err) as download:
        decided = decide_launch(launch, download=download)
    render_launch(decided, out)
    render_slots(decided, out)
    if not is_loopback(host) and not (api_key or file_keys):
        err.print(f"warning: listening on {host} without an API key: anyone who can reach this port can use the "
                  "model (set --api-key or LCRUN_API_KEY)", style="yellow", highlight=False)
    if dry_run:
        return
    options = ServeOptions(host=host, port=port, api_key=api_key, api_keys=file_keys, allowed_hosts=allowed_hosts,
                           cors_origins=cors_origins, max_body=max_body, max_connections=max_connections,
                           max_queue=max_queue, cache_dir=cache_dir, cache_max_bytes=cache_size,
                           cache_min_tokens=cache_min_tokens, verbose=verbose)
    sock = bind(host, port)  # before the model loads: a busy port fails at once
    try:
        with open_model(decided, loading=loading_status(err)) as model:
            path = model.model_path
            state = prepare(model.engine, options, model_id=alias or path.name,
                            aliases=(launch.model, path.name, path.stem), chat_format=model.chat_format)
            bound = sock.getsockname()
            where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            url = f"http://{where}:{bound[1]}"
            on_ready = lambda: out.print(  # noqa: E731
                f"serving {state.model_id} at {url}/v1 (health {url}/health, metrics {url}/metrics); "
                "Ctrl-C to stop", highlight=False, soft_wrap=True)
            run_server(state, sock, options, on_ready=on_ready)
    finally:
        sock.close()
    out.print("stopped", highlight=False)
