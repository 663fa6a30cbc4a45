"""How chat, niah and bench should drive the decode loop for their one request: in the calling thread
(lcrun.generation.drive.generate: each next() runs loop steps until there are events), or from a thread of its own
that hands the events over a queue (as serve's scheduler does for many requests). Same engine, same request, rounds
interleaved; generation tok/s (Finished's: first to last sampled token) and the wall time per request.

    .venv/bin/python benchmarks/bench_drive.py [MODEL] [--tokens 512] [--rounds 9] [--threads 1] [--off-main]

On the shared 2-vCPU VM under load, llama_decode runs several times faster in a freshly started thread than in a
long-running one (the main thread or any other; llama-cpp-python's own `Llama` alike; docs/performance.md), and the
queue's way starts a thread per request. `--off-main` runs the comparison in a thread other than the main one, after
a first decode in a throwaway thread (to tell that effect from one of the thread that computed first).
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lcrun.engine.protocol import GREEDY, EngineConfig
from lcrun.engine.runtime import Engine
from lcrun.generation.drive import generate, prefill
from lcrun.generation.loop import DecodeLoop
from lcrun.generation.records import Finished, GenerateEvent, GenerationParams, Request
from lcrun.launch.model_file import demo_gguf


def generate_threaded(engine: Engine, request: Request) -> Iterator[GenerateEvent]:
    """The alternative: the loop steps in a thread; events cross a queue to the caller."""
    events: queue.SimpleQueue[GenerateEvent] = queue.SimpleQueue()
    loop = DecodeLoop(engine)
    loop.submit(loop.slots[0], request, events.put)

    def run() -> None:
        while loop.busy:
            loop.step()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while True:
        event = events.get()
        yield event
        if isinstance(event, Finished):
            worker.join()
            return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--off-main", action="store_true")
    args = parser.parse_args()
    if args.off_main:
        worker = threading.Thread(target=compare, args=(args,))
        worker.start()
        worker.join()
    else:
        compare(args)


def compare(args: argparse.Namespace) -> None:
    path = args.model or demo_gguf()
    engine = Engine(EngineConfig(model_path=path, n_ctx=4096, n_threads=args.threads, n_batch=2048, n_ubatch=512,
                                 flash_attn=False))
    prompt = engine.tokenize("Tell me about the lighthouse keeper and the winter storm.", add_bos=True)
    request = Request(prompt, GenerationParams(GREEDY, max_tokens=args.tokens, ignore_eos=True))
    if args.off_main:  # the first decode in a thread of its own, which neither way below uses
        first = threading.Thread(target=lambda: list(generate(engine, request)))
        first.start()
        first.join()
    ways = {"calling thread": generate, "own thread + queue": generate_threaded}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    walls: dict[str, list[float]] = {name: [] for name in ways}
    load = os.getloadavg()[0]
    for r in range(args.rounds + 1):
        names = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in names:
            list(prefill(engine, [prompt[0] ^ 1]))  # empty the cache
            started = time.perf_counter()
            finished = list(ways[name](engine, request))[-1]
            assert isinstance(finished, Finished) and finished.completion_tokens == args.tokens
            if r:  # round 0 warms up
                rates[name].append(finished.gen_tokens_per_s)
                walls[name].append(time.perf_counter() - started)
    engine.close()
    where = "off the main thread" if args.off_main else "on the main thread"
    print(f"{path.name}, {args.tokens} tokens, {args.threads} thread(s), {where}, {args.rounds} rounds, load average "
          f"{load:.2f} -> {os.getloadavg()[0]:.2f}")
    base = "calling thread"
    for name in ways:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[base]))
        print(f"  {name:20} {statistics.median(rates[name]):8.1f} tok/s (median; {ratio:.3f} of the calling "
              f"thread's, per round), wall {statistics.median(walls[name]):.3f} s")


if __name__ == "__main__":
    main()
