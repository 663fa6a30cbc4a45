"""One side of bench_chat.py's generation comparison, in a process of its own: an lcrun checkout's engine (this one
or another, run with that checkout's Python) or llama-cpp-python's `Llama` called directly, with the same settings.
Two lcrun versions cannot share a process (both are the package `lcrun`); a process per side keeps them apart and
lets the driver interleave their rounds.

    PYTHON benchmarks/gen_side.py lcrun|direct MODEL --ctx N --threads N --n-batch N --n-ubatch N [--flash-attn]

Reads one JSON command per line on stdin, answers one JSON line on stdout:
    {"op": "gen", "prompt": [...], "n": N}  ->  {"tok_s": …, "ttft_s": …, "tokens": [first N tokens]}
    {"op": "quit"}

Every side: N greedy tokens after `prompt`, the cache emptied first, timed as a front end sees them: from the
first token's text to the N-th's, N - 1 decodes and N - 1 samples whichever way a side orders them (lcrun hands a
token's text out when it is sampled; lcrun before issue 16, without lcrun.generation, after it is decoded and the next
sampled — it is asked for N + 1 tokens, so the N-th comes out; `Llama.generate` yields a token when it is sampled).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def rate(stamps: list[tuple[int, float]], n: int) -> float:
    """Tokens per second between the first text and the text completing the n-th token, from (tokens so far, time)
    pairs: a character split across tokens comes out with its last token, so counts may jump."""
    within = [(count, at) for count, at in stamps if count <= n]
    (c0, t0), (c1, t1) = within[0], within[-1]
    return (c1 - c0) / (t1 - t0)


def lcrun_side(args: argparse.Namespace) -> Any:
    from lcrun.engine.runtime import Engine, EngineConfig

    engine = Engine(EngineConfig(model_path=Path(args.model), n_ctx=args.ctx, n_threads=args.threads,
                                 n_batch=args.n_batch, n_ubatch=args.n_ubatch, flash_attn=args.flash_attn))
    try:
        from lcrun.engine.protocol import GREEDY
        from lcrun.generation.drive import generate, prefill
        from lcrun.generation.records import GenerationParams, Request
    except ImportError:  # the engine before issue 16: its own Engine.generate, which decodes every sampled token
        from lcrun.engine.runtime import Sampling

        def events(prompt: list[int], n: int) -> Any:
            list(engine.prefill([prompt[0] ^ 1]))  # a one-token prompt sharing nothing empties the cache
            return engine.generate(prompt, Sampling(temperature=0.0, max_tokens=n + 1), ignore_eog=True)
    else:
        def events(prompt: list[int], n: int) -> Any:
            list(prefill(engine, [prompt[0] ^ 1]))
            return generate(engine, Request(prompt, GenerationParams(GREEDY, max_tokens=n, ignore_eos=True)))

    def run(prompt: list[int], n: int) -> dict[str, Any]:
        started, stamps, count, finished = time.perf_counter(), [], 0, None
        for event in events(prompt, n):
            kind = type(event).__name__
            if kind == "TextChunk":
                count += event.n_tokens
                stamps.append((count, time.perf_counter()))
            elif kind == "Finished":
                finished = event
        assert finished is not None
        tokens = list(getattr(finished, "tokens", ()) or engine.cached_tokens[len(prompt):])[:n]
        return {"tok_s": rate(stamps, n), "ttft_s": stamps[0][1] - started, "tokens": tokens,
                "finished_tok_s": finished.gen_tokens_per_s}

    return run


def direct_side(args: argparse.Namespace) -> Any:
    import llama_cpp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fixtures.llama_peer import match_engine_weights

    match_engine_weights()  # the engine's weight repacking (no AMX: ggml-org/llama.cpp#20824)
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                          n_threads=args.threads, flash_attn=args.flash_attn, yarn_attn_factor=-1.0,
                          yarn_beta_fast=-1.0, yarn_beta_slow=-1.0, logits_all=False, verbose=False)

    def run(prompt: list[int], n: int) -> dict[str, Any]:
        llm.reset()
        started, stamps, tokens = time.perf_counter(), [], []
        for token in llm.generate(prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                                  reset=True):
            tokens.append(int(token))
            stamps.append((len(tokens), time.perf_counter()))
            if len(tokens) == n:
                break
        return {"tok_s": rate(stamps, n), "ttft_s": stamps[0][1] - started, "tokens": tokens}

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["lcrun", "direct"])
    parser.add_argument("model")
    parser.add_argument("--ctx", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-batch", type=int, default=2048)
    parser.add_argument("--n-ubatch", type=int, default=512)
    parser.add_argument("--flash-attn", action="store_true")
    args = parser.parse_args()
    run = lcrun_side(args) if args.side == "lcrun" else direct_side(args)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        print(json.dumps(run(command["prompt"], command["n"])), flush=True)


if __name__ == "__main__":
    main()
