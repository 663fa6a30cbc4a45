"""What structured output and log-probabilities cost: generation tok/s of a chat completion held to a JSON schema
against the same request unconstrained, and with `logprobs` (top 5) against without, through `lcrun serve` and
llama-cpp-python's own server, same GGUF, same threads and context, interleaved rounds, medians.

    .venv/bin/pip install fastapi sse-starlette starlette-context pydantic-settings   # the peer's web stack
    .venv/bin/python benchmarks/bench_structured.py [--model GGUF] [--rounds N] [--threads N] [--max-tokens N]
        [--json OUT]

The peer honours a schema only as `response_format: {"type": "json_object", "schema": …}` (OpenAI's `json_schema`
it ignores: llama-cpp-python PR #1677), so it gets that; lcrun gets OpenAI's `json_schema`. The peer's sampler chain
applies the grammar to the whole vocabulary before every token; lcrun samples, checks the one token, and resamples
with the grammar only when it refuses (lcrun/engine/grammar.py). Each figure: completion tokens over the time
from the request to its last streamed text; a constrained reply ends when its JSON does, so the schema asks for enough
of it (6 records: ~430 tokens at temperature 0). log-probabilities (top 5) are measured on shorter replies
(`--logprobs-tokens`, 128) against free replies of the same length. Whether each constrained reply parses is counted too (the peer's grammar reads a token's text as a
C string, so on this vocabulary tokens holding a NUL byte pass it unchecked and its replies need not parse).

The model: `--model`, else a Llama-3-vocabulary file (128,256 tokens and 280,147 merges, one tiny random layer:
tests/fixtures/realistic_gguf.py) written to bench-work/structured-llama3.gguf — the pessimistic case: its decode
takes ~2 ms, so the grammar's cost is most of a token's, and random weights pick tokens the grammar refuses at every
structural point. A real model mostly writes the JSON it is asked for; pass one to measure that case.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_serve import Server, free_port, log  # noqa: E402  (the path is set just above)

from tests.fixtures.llama_peer import PEER_PRELUDE  # noqa: E402

SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "minItems": 6, "maxItems": 6, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "count": {"type": "integer"},
                                     "ok": {"type": "boolean"}, "kind": {"enum": ["a", "b", "c"]}},
    "required": ["name", "count", "ok", "kind"]}}}, "required": ["records"]}
PROMPT = "List six inventory records as JSON: a name, a count, whether it is ok, and its kind."


def start_lcrun(args: argparse.Namespace) -> Server:
    port = free_port()
    return Server("lcrun", [sys.executable, "-m", "lcrun.cli", "serve", str(args.model), "--host", "127.0.0.1",
                            "--port", str(port), "--ctx", str(args.ctx), "--threads", str(args.threads),
                            "--threads-batch", str(args.threads), "--flash-attn", "on"], port)


def start_peer(args: argparse.Namespace) -> Server:
    port = free_port()
    serve = "import runpy; runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"
    return Server("peer", [sys.executable, "-c", PEER_PRELUDE + serve, "--model", str(args.model), "--host",
                           "127.0.0.1", "--port", str(port), "--n_ctx", str(args.ctx), "--n_threads",
                           str(args.threads), "--n_threads_batch", str(args.threads), "--flash_attn", "True",
                           "--n_gpu_layers", "0", "--interrupt_requests", "False", "--verbose", "False"], port)


def timed(server: Server, max_tokens: int, **extra: Any) -> dict[str, Any]:
    started = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    usage = None
    chunks = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, **extra)
    for chunk in chunks:
        if getattr(chunk, "usage", None):
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].delta.content)
    tokens = usage.completion_tokens if usage else len(stamps)
    # from the request to its last text: the ~40-token prompt's prefill (the same in every variant) and a grammar's
    # set-up included; not from the first chunk, as a server that holds text back (the peer does, under a grammar)
    # would look faster than it is
    span = stamps[-1] - started if stamps else 0.0
    text = "".join(pieces)
    try:
        parses = isinstance(json.loads(text), dict)
    except ValueError:
        parses = False
    return {"tps": tokens / span if span > 0 else 0.0, "tokens": tokens, "parses": parses,
            "wall_s": time.perf_counter() - started}


def schema_form(name: str) -> dict[str, Any]:
    if name == "peer":
        return {"response_format": {"type": "json_object", "schema": SCHEMA}}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "records", "schema": SCHEMA}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=600)   # the six records take ~430 with random weights
    parser.add_argument("--logprobs-tokens", type=int, default=128)  # the peer's logprobs run at ~4 tok/s
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.model is None:
        args.model = REPO / "bench-work" / "structured-llama3.gguf"
        if not args.model.exists():
            from tests.fixtures.realistic_gguf import write_realistic_gguf

            args.model.parent.mkdir(parents=True, exist_ok=True)
            write_realistic_gguf(args.model.with_suffix(".partial"), "llama3").rename(args.model)
    servers = [start_lcrun(args), start_peer(args)]
    rows: dict[str, dict[str, list[Any]]] = {
        s.name: {k: [] for k in ("free", "schema", "short", "logprobs", "parses")} for s in servers}
    try:
        for server in servers:  # warm-up: the vocabulary index for grammars, the first decode's allocations
            timed(server, 16, **schema_form(server.name))
            timed(server, 16)
        for r in range(args.rounds):
            for server in (servers if r % 2 == 0 else servers[::-1]):
                row = rows[server.name]
                free = timed(server, args.max_tokens)
                shaped = timed(server, args.max_tokens, **schema_form(server.name))
                short = timed(server, args.logprobs_tokens)
                scored = timed(server, args.logprobs_tokens, logprobs=True, top_logprobs=5)
                row["free"].append(free["tps"])
                row["schema"].append(shaped["tps"])
                row["short"].append(short["tps"])
                row["logprobs"].append(scored["tps"])
                row["parses"].append(shaped["parses"])
                log(f"round {r + 1} {server.name}: free {free['tps']:.1f} tok/s, schema {shaped['tps']:.1f} tok/s "
                    f"({shaped['tokens']} tokens, parses: {shaped['parses']}); {args.logprobs_tokens} tokens: free "
                    f"{short['tps']:.1f} tok/s, logprobs {scored['tps']:.1f} tok/s")
    finally:
        for server in servers:
            server.stop()
    out: dict[str, Any] = {"model": str(args.model), "machine": platform.processor() or platform.machine(),
                           "threads": args.threads, "rounds": args.rounds}
    for name, row in rows.items():
        free, shaped, short, scored = (statistics.median(row[k]) for k in ("free", "schema", "short", "logprobs"))
        # ratios: medians of the per-round ratios (each round's pair ran back to back)
        schema_ratio = statistics.median(a / b for a, b in zip(row["schema"], row["free"]) if b)
        logprobs_ratio = statistics.median(a / b for a, b in zip(row["logprobs"], row["short"]) if b)
        out[name] = {"free_tps": free, "schema_tps": shaped, "schema_ratio": schema_ratio, "short_free_tps": short,
                     "logprobs_tps": scored, "logprobs_ratio": logprobs_ratio,
                     "schema_parses": f"{sum(row['parses'])}/{len(row['parses'])}"}
        print(f"{name}: free {free:.1f} tok/s, json_schema {shaped:.1f} tok/s ({schema_ratio:.2f}x, parses "
              f"{out[name]['schema_parses']}); free {short:.1f} tok/s, logprobs {scored:.1f} tok/s "
              f"({logprobs_ratio:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
