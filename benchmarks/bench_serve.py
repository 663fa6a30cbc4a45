"""`lcrun serve` against llama-cpp-python's own server (`python -m llama_cpp.server`), same GGUF, per-request context,
threads, batch sizes, flash attention and KV type, driven by the same OpenAI-client code, interleaved.

    .venv/bin/pip install 'llama-cpp-python[server]==0.3.36'     # the peer's web stack (fastapi, sse-starlette, …)
    .venv/bin/python benchmarks/bench_serve.py [--model GGUF] [--rounds N] [--threads N] [--gen-tokens N]
        [--doc-tokens N] [--json OUT]

Figures (medians over the rounds; each round runs lcrun and the peer one after the other, alternating which first):

1. Single-client generation tok/s (target lcrun / peer >= 0.97): one streamed /v1/completions at temperature 0 with
   a short prompt and max_tokens N; (tokens - 1) over the time from the first streamed token to the last. lcrun as it
   starts by default (one slot, the same context as the peer); the same request to the 4-slot server is reported
   beside it.
2. Aggregate generation tok/s with 4 concurrent clients, each sending `--requests` completions of N tokens: all
   completion tokens over the wall time; with both, the server process's CPU time per token (all its threads), which
   a busy shared machine skews far less than wall time. lcrun runs 4 slots (-np 4); the peer serves one request at a time behind
   its lock (interrupt_requests off, so streams are not cut). The ceiling is llama.cpp's own: the same context
   (4 sequences, the engine's parameters) driven through llama_cpp's low-level API — llama_decode of one token of each
   of 4 sequences per batch, against 1 — greedy sampling included, no HTTP. Targets: lcrun's aggregate >= 85 % of the
   4-sequence ceiling, and >= 1.5x the peer's.
3. Time to first token of a follow-up on a `--doc-tokens` document (target <= 5 % of the first request's): a chat
   request with the document and a question, then the conversation so far plus a follow-up question. Each round uses
   a new document, so nothing is cached before the first request.
4. The same follow-up after a restart with --cache-dir (target <= 10 % of the first request's): lcrun with a fresh
   cache directory answers the first request (its prompt's KV state is saved), is stopped (SIGTERM) and started
   again, and answers the follow-up.

The model: `--model`, else bench-work/mid-q8_0.gguf (a Llama-3.1-shaped Q8_0, hidden 1024, 8 layers, vocabulary
128256; `benchmarks/make_bench_checkpoint.py bench-work/ckpt` then `lcrun convert bench-work/ckpt --outtype q8_0 -o
bench-work/mid-q8_0.gguf`). Servers listen on 127.0.0.1 on free ports and are stopped at the end.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fixtures.llama_peer import PEER_PRELUDE  # noqa: E402  (the path is set just above)

BENCH_WORK = REPO / "bench-work"
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
GEN_PROMPT = ("You are a careful assistant. Explain, step by step and with examples, how a lighthouse keeper kept the "
              "lamp burning through a winter storm.")
WORDS = ("river mill fox barn harbour lantern keeper storm winter ledger merchant village bridge tower signal orchard "
         "granary weaver smith ferry market chapel meadow quarry lighthouse captain cargo rope anchor tide gull").split()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, cwd: Path = REPO) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                self.model = get_json(self.url + "/v1/models")["data"][0]["id"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (all its threads, llama.cpp's included): what a busy shared
        machine does not skew the way it skews wall time."""
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_lcrun(args: argparse.Namespace, settings: dict[str, Any], slots: int, cache_dir: Path | None = None,
                checkout: Path | None = None) -> Server:
    """`lcrun serve` of this checkout, or of `checkout` (another one, with its own .venv: the previous main)."""
    port = free_port()
    python = str(checkout / ".venv" / "bin" / "python") if checkout is not None else sys.executable
    cmd = [python, "-m", "lcrun.cli", "serve", str(args.model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "--ctx", str(settings["ctx_per_request"] * slots), "--threads", str(args.threads),
           "--threads-batch", str(settings["n_threads_batch"]),
           "--flash-attn", "on" if settings["flash_attn"] else "off", "--kv-type", settings["kv"]]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    return Server("lcrun", cmd, port, cwd=checkout or REPO)


def start_peer(args: argparse.Namespace, settings: dict[str, Any]) -> Server:
    port = free_port()
    k, _, v = settings["kv"].partition("/")
    # llama_cpp.server with the engine's weight repacking (no AMX: ggml-org/llama.cpp#20824); run from the repository
    serve = "import runpy; runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"
    cmd = [sys.executable, "-c", PEER_PRELUDE + serve, "--model", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(settings["ctx_per_request"]), "--n_threads", str(args.threads),
           "--n_threads_batch", str(settings["n_threads_batch"]), "--n_batch", str(settings["n_batch"]),
           "--n_ubatch", str(settings["n_ubatch"]), "--flash_attn", str(settings["flash_attn"]),
           "--type_k", str(GGML_TYPES[k]), "--type_v", str(GGML_TYPES[v or k]), "--n_gpu_layers", "0",
           "--interrupt_requests", "False", "--verbose", "False"]
    return Server("peer", cmd, port)


# -- measurements over HTTP -------------------------------------------------------------------------------------------
def stream(server: Server, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
           max_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    """One streamed request: time to first token, generation rate between the first and the last token."""
    started = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    usage = None
    common = dict(model=server.model, max_tokens=max_tokens, temperature=temperature, stream=True,
                  stream_options={"include_usage": True})
    if messages is not None:
        chunks = server.client.chat.completions.create(messages=messages, **common)  # type: ignore[arg-type]
    else:
        chunks = server.client.completions.create(prompt=prompt, **common)  # type: ignore[arg-type]
    for chunk in chunks:
        if getattr(chunk, "usage", None):
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text = choice.delta.content if messages is not None else choice.text
        if text:
            stamps.append(time.perf_counter())
            pieces.append(text)
    tokens = usage.completion_tokens if usage else len(stamps)
    cached = None
    if usage is not None and getattr(usage, "prompt_tokens_details", None) is not None:
        cached = usage.prompt_tokens_details.cached_tokens
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"ttft_s": (stamps[0] if stamps else time.perf_counter()) - started, "tokens": tokens,
            "gen_tps": (tokens - 1) / span if span > 0 else 0.0, "text": "".join(pieces), "cached_tokens": cached,
            "prompt_tokens": usage.prompt_tokens if usage else None}


def concurrent(server: Server, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            out = stream(server, prompt=f"Client {i}, request {j}. {GEN_PROMPT}", max_tokens=max_tokens)
            with lock:
                results.append(out)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {"aggregate_tps": tokens / wall, "tokens": tokens, "wall_s": wall}


def document(tokenize: Callable[[str], list[int]], n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences = []
    while True:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
        if len(sentences) % 50 == 0 and len(tokenize(" ".join(sentences))) >= n_tokens:
            break
    text = " ".join(sentences)
    while len(tokenize(text)) > n_tokens:
        text = text[: int(len(text) * 0.995)]
    return text


def follow_up(server: Server, doc: str, reply_tokens: int) -> tuple[dict[str, Any], list[dict[str, str]]]:
    messages = [{"role": "user", "content": doc + "\n\nWhat is the first thing the document mentions?"}]
    first = stream(server, messages=messages, max_tokens=reply_tokens)
    return first, messages + [{"role": "assistant", "content": first["text"]},
                              {"role": "user", "content": "And what comes right after it?"}]


# -- the ceiling: llama_decode through the low-level API ---------------------------------------------------------------
_QUIET: list[Any] = []


def ceiling(config: Any, n_seqs: int, n_tokens: int) -> float:
    """Generation tok/s of `n_seqs` sequences decoded one token each per llama_decode (greedy sampling of each), in a
    context made with the engine's parameters, after a short prompt per sequence and 16 untimed steps."""
    import llama_cpp as lc

    from lcrun.engine.params import context_params, model_params

    if not _QUIET:  # llama.cpp's log would flood stderr
        _QUIET.append(lc.llama_log_callback(lambda level, text, data: None))
        lc.llama_log_set(_QUIET[0], ctypes.c_void_p(0))
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(config.model_path).encode(), model_params(config))
    ctx = lc.llama_init_from_model(model, context_params(config))
    try:
        vocab = lc.llama_model_get_vocab(model)
        prompt_len = 32
        batch = lc.llama_batch_init(max(prompt_len * n_seqs, n_seqs), 0, 1)

        def fill(entries: list[tuple[int, int, int, bool]]) -> None:
            batch.n_tokens = len(entries)
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits

        samplers = []
        for _ in range(n_seqs):
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            samplers.append(chain)
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        fill([((97 * i + 13 * s) % (n_vocab // 2) + n_vocab // 4, i, s, i == prompt_len - 1)
              for s in range(n_seqs) for i in range(prompt_len)])
        assert lc.llama_decode(ctx, batch) == 0
        tokens = [lc.llama_sampler_sample(samplers[s], ctx, s * prompt_len + prompt_len - 1) for s in range(n_seqs)]
        warmup = 16  # untimed: the first decodes of a fresh context touch its buffers for the first time
        for step in range(warmup + n_tokens):
            if step == warmup:
                started = time.perf_counter()
            fill([(tokens[s], prompt_len + step, s, True) for s in range(n_seqs)])
            assert lc.llama_decode(ctx, batch) == 0
            tokens = [lc.llama_sampler_sample(samplers[s], ctx, s) for s in range(n_seqs)]
        elapsed = time.perf_counter() - started
        for chain in samplers:
            lc.llama_sampler_free(chain)
        lc.llama_batch_free(batch)
        return n_seqs * n_tokens / elapsed
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)


# -- the run ---------------------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_round(samples: dict[str, list[Any]], a: str, b: str) -> float:
    """The median over rounds of a/b measured in the same round."""
    return median([x / y for x, y in zip(samples.get(a, []), samples.get(b, [])) if x and y])


def table(samples: dict[str, list[Any]], model: str, threads: int, ctx_per_request: int, kv: str, flash_attn: bool,
          doc_tokens: int) -> str:
    """Medians over the rounds; ratios are medians of the per-round ratios (each round's two figures were measured
    minutes apart, so drift in a shared machine cancels better than in a ratio of medians)."""
    m = {k: median([float(x) for x in v]) for k, v in samples.items() if v and v[0] is not None}
    g = lambda k: m.get(k, float("nan"))  # noqa: E731
    rows = [
        ("single-client generation tok/s", f"{g('lcrun_single'):.1f}", f"{g('peer_single'):.1f}",
         f"{per_round(samples, 'lcrun_single', 'peer_single'):.3f} (target >= 0.97)"),
        ("single client on the 4-slot server, tok/s", f"{g('lcrun4_single'):.1f}", "",
         f"{per_round(samples, 'lcrun4_single', 'peer_single'):.3f}"),
        ("4 clients, aggregate tok/s", f"{g('lcrun_4'):.1f}", f"{g('peer_4'):.1f}",
         f"{per_round(samples, 'lcrun_4', 'peer_4'):.2f}x the peer (target >= 1.5x); "
         f"{per_round(samples, 'lcrun_4', 'ceiling_4'):.1%} of the ceiling (target >= 85 %)"),
        ("ceiling: llama_decode 1 / 4 sequences tok/s", f"{g('ceiling_1'):.1f} / {g('ceiling_4'):.1f}", "",
         f"{per_round(samples, 'ceiling_4', 'ceiling_1'):.2f}x"),
        (f"TTFT first request ({doc_tokens}-token document)", f"{g('lcrun_ttft_first'):.2f} s",
         f"{g('peer_ttft_first'):.2f} s", ""),
        ("TTFT follow-up", f"{g('lcrun_ttft_follow'):.3f} s", f"{g('peer_ttft_follow'):.3f} s",
         f"{per_round(samples, 'lcrun_ttft_follow', 'lcrun_ttft_first'):.1%} of the first (target <= 5 %); peer "
         f"{per_round(samples, 'peer_ttft_follow', 'peer_ttft_first'):.1%}"),
        ("TTFT follow-up after a restart (--cache-dir)", f"{g('restart_ttft_follow'):.3f} s", "",
         f"{per_round(samples, 'restart_ttft_follow', 'restart_ttft_first'):.1%} of the first "
         f"({g('restart_ttft_first'):.2f} s; target <= 10 %)"),
    ]
    if samples.get("base_single"):
        if samples.get("base_4_cpu_ms"):
            rows[3:3] = [
                ("CPU ms per token, single client / 4 clients (server process)",
                 f"{g('lcrun_single_cpu_ms'):.2f} / {g('lcrun_4_cpu_ms'):.2f}", "",
                 f"previous main {g('base_single_cpu_ms'):.2f} / {g('base_4_cpu_ms'):.2f}; lcrun / previous main "
                 f"{per_round(samples, 'lcrun_single_cpu_ms', 'base_single_cpu_ms'):.3f} / "
                 f"{per_round(samples, 'lcrun_4_cpu_ms', 'base_4_cpu_ms'):.3f} (lower is better)"),
            ]
        rows[3:3] = [
            ("previous main (--base): single-client tok/s", f"{g('base_single'):.1f}", "",
             f"lcrun / previous main {per_round(samples, 'lcrun_single', 'base_single'):.3f} (target >= 1.00)"),
            ("previous main: single client on the 4-slot server", f"{g('base4_single'):.1f}", "",
             f"lcrun / previous main {per_round(samples, 'lcrun4_single', 'base4_single'):.3f}"),
            ("previous main: 4 clients, aggregate tok/s", f"{g('base_4'):.1f}", "",
             f"lcrun / previous main {per_round(samples, 'lcrun_4', 'base_4'):.3f} (target >= 1.00)"),
        ]
    lines = [f"| {model}, {threads} thread(s), {ctx_per_request} tokens per request, KV {kv}, flash attention "
             f"{'on' if flash_attn else 'off'} | lcrun serve | llama_cpp.server | ratio |", "|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=BENCH_WORK / "mid-q8_0.gguf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--threads-batch", type=int, help="threads for batches of several tokens (default: --threads)")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the 4-client run")
    parser.add_argument("--doc-tokens", type=int, default=4096)
    parser.add_argument("--ttft-rounds", type=int, default=2, help="rounds of the document measurements")
    parser.add_argument("--base", type=Path, metavar="CHECKOUT",
                        help="another lcrun checkout (with its .venv), measured beside this one: the previous main")
    parser.add_argument("--no-peer", action="store_true", help="leave llama_cpp.server out")
    parser.add_argument("--generation-only", action="store_true",
                        help="single-client and 4-client generation only (no ceiling, no document measurements)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the table of a saved --json run and exit")
    args = parser.parse_args()
    if args.table:
        saved = json.loads(args.table.read_text())
        st = saved["settings"]
        print(table(saved["samples"], Path(saved["model"]).name, st["n_threads"], st["ctx_per_request"], st["kv"],
                    st["flash_attn"], int(saved["args"]["doc_tokens"])))
        return
    if not args.model.is_file():
        sys.exit(f"error: {args.model}: no such GGUF (see the docstring to make bench-work/mid-q8_0.gguf)")
    args.model = args.model.resolve()  # a --base checkout's server runs in that checkout

    from lcrun.launch.decide import decide_launch
    from lcrun.launch.options import LaunchOptions

    reply_tokens = 32
    ctx_per_request = -(-(args.doc_tokens + 2 * reply_tokens + 256) // 256) * 256
    launch = decide_launch(LaunchOptions(str(args.model), ctx=ctx_per_request * 4, threads=args.threads, n_seq=4))
    config = replace(launch.config, n_seq=4, n_threads_batch=args.threads_batch or args.threads)
    kv = config.type_k if config.type_k == config.type_v else f"{config.type_k}/{config.type_v}"
    settings = {"ctx_per_request": ctx_per_request, "flash_attn": config.flash_attn, "kv": kv,
                "n_batch": config.n_batch, "n_ubatch": config.n_ubatch, "n_threads": args.threads,
                "n_threads_batch": config.n_threads_batch}
    log(f"settings: {settings}")

    import llama_cpp

    vocab_only = llama_cpp.Llama(str(args.model), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return vocab_only.tokenize(text.encode(), add_bos=False)

    samples: dict[str, list[Any]] = {k: [] for k in (
        "lcrun_single", "peer_single", "lcrun4_single", "lcrun_4", "peer_4", "ceiling_1", "ceiling_4",
        "base_single", "base4_single", "base_4",
        "lcrun_ttft_first", "lcrun_ttft_follow", "peer_ttft_first", "peer_ttft_follow",
        "restart_ttft_first", "restart_ttft_follow", "lcrun_follow_cached", "restart_follow_cached")}
    loads = [os.getloadavg()]
    singles: list[Server] = []   # every server started, stopped at the end whatever happens
    fours: list[Server] = []
    peer = None
    try:
        lcrun1 = start_lcrun(args, settings, 1)
        singles.append(lcrun1)
        lcrun = start_lcrun(args, settings, 4)
        lcrun1.name, lcrun.name = "lcrun", "lcrun4"
        singles.append(lcrun)
        fours.append(lcrun)
        if not args.no_peer:
            peer = start_peer(args, settings)
            singles.append(peer)
            fours.append(peer)
        if args.base is not None:
            base1 = start_lcrun(args, settings, 1, checkout=args.base)
            base1.name = "base"
            singles.append(base1)
            base = start_lcrun(args, settings, 4, checkout=args.base)
            base.name = "base4"
            singles.append(base)
            fours.append(base)
        for server in singles:  # warm-up: page the weights in, first-request costs out of the way
            stream(server, prompt=GEN_PROMPT, max_tokens=4)
        for r in range(args.rounds):
            shift = r % len(singles)  # each round starts with the next server: drift falls on all alike
            for server in singles[shift:] + singles[:shift]:
                cpu = server.cpu_s()
                out = stream(server, prompt=GEN_PROMPT, max_tokens=args.gen_tokens)
                samples[f"{server.name}_single"].append(out["gen_tps"])
                samples.setdefault(f"{server.name}_single_cpu_ms", []).append(
                    1000 * (server.cpu_s() - cpu) / max(out["tokens"], 1))
                log(f"round {r + 1}: {server.name} single {out['gen_tps']:.1f} tok/s ({out['tokens']} tokens)")
            shift = r % len(fours)
            for server in fours[shift:] + fours[:shift]:
                cpu = server.cpu_s()
                out = concurrent(server, 4, args.requests, args.gen_tokens)
                samples[f"{server.name.rstrip('4')}_4"].append(out["aggregate_tps"])
                samples.setdefault(f"{server.name.rstrip('4')}_4_cpu_ms", []).append(
                    1000 * (server.cpu_s() - cpu) / max(out["tokens"], 1))
                log(f"round {r + 1}: {server.name} 4 clients {out['aggregate_tps']:.1f} tok/s aggregate")
            if args.generation_only:
                continue
            for n in ((1, 4) if r % 2 == 0 else (4, 1)):
                tps = ceiling(config, n, args.gen_tokens)
                samples[f"ceiling_{n}"].append(tps)
                log(f"round {r + 1}: ceiling {n} sequence(s) {tps:.1f} tok/s")
        for r in range(0 if args.generation_only or peer is None else args.ttft_rounds):
            doc = document(tokenize, args.doc_tokens, seed=1000 + r)
            for server in ([lcrun, peer] if r % 2 == 0 else [peer, lcrun]):
                name = server.name.rstrip("4")
                first, messages = follow_up(server, doc + f" (copy {name})", reply_tokens)
                follow = stream(server, messages=messages, max_tokens=reply_tokens)
                samples[f"{name}_ttft_first"].append(first["ttft_s"])
                samples[f"{name}_ttft_follow"].append(follow["ttft_s"])
                if server is lcrun:
                    samples["lcrun_follow_cached"].append(follow["cached_tokens"])
                log(f"ttft {r + 1}: {server.name} first {first['ttft_s']:.2f} s ({first['prompt_tokens']} prompt "
                    f"tokens), follow-up {follow['ttft_s']:.3f} s (cached {follow['cached_tokens']})")
    finally:
        for server in singles:
            server.stop()
    for r in range(0 if args.generation_only else args.ttft_rounds):
        doc = document(tokenize, args.doc_tokens, seed=2000 + r)
        with tempfile.TemporaryDirectory(prefix="bench-serve-cache-") as cache_dir:
            server = start_lcrun(args, settings, 4, Path(cache_dir))
            try:
                first, messages = follow_up(server, doc, reply_tokens)
                deadline = time.monotonic() + 120
                while not any(Path(cache_dir).glob("*.lcrunkv")) and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                code = server.stop()
            assert code == 0, f"lcrun serve exited {code}"
            server = start_lcrun(args, settings, 4, Path(cache_dir))
            try:
                follow = stream(server, messages=messages, max_tokens=reply_tokens)
            finally:
                server.stop()
        samples["restart_ttft_first"].append(first["ttft_s"])
        samples["restart_ttft_follow"].append(follow["ttft_s"])
        samples["restart_follow_cached"].append(follow["cached_tokens"])
        log(f"restart {r + 1}: first {first['ttft_s']:.2f} s, follow-up after restart {follow['ttft_s']:.3f} s "
            f"(cached {follow['cached_tokens']})")
    loads.append(os.getloadavg())

    print(table(samples, args.model.name, args.threads, ctx_per_request, kv, config.flash_attn, args.doc_tokens))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": str(args.model), "settings": settings, "samples": samples,
            "medians": {k: median([float(x) for x in v]) for k, v in samples.items() if v and v[0] is not None},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": loads},
            "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
