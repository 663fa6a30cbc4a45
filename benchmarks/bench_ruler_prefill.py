"""Tokens the RULER-style suite prefills, with its documents shared between tasks and without (a naive run prefills
every prompt whole), for a grid of lengths × KV types × the six tasks — counted by running the suite's own runner
against an answerer that keeps a KV prefix cache as llama.cpp's engine does and answers nothing. Also the time to
build the prompts (tokenizing the haystack and the word lists). No model runs: wall time of a real run is the
engine's (issue 18, phase 2).

    .venv/bin/python benchmarks/bench_ruler_prefill.py                       # a Llama-3-shaped 128K vocabulary
    .venv/bin/python benchmarks/bench_ruler_prefill.py --model model.gguf --lengths 8k,16k,32k --kv f16,q8_0

The default tokenizer is tests/fixtures/realistic_gguf.py's Llama 3 vocabulary (128,256 tokens, 280,147 merges)
through llama.cpp. Its merges are random, so English costs about a token a character — four times Llama 3's — and
the questions, which are the part not shared, weigh about four times what they would: the ratio is a lower bound.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcrun.chat.formats import engine_renderer  # noqa: E402  (the path is set just above)
from lcrun.engine.protocol import EngineConfig  # noqa: E402
from lcrun.engine.runtime import Engine  # noqa: E402
from lcrun.kv_types import KvType  # noqa: E402
from lcrun.niah.haystack import read_haystack  # noqa: E402
from lcrun.niah.results import ResultsLog  # noqa: E402
from lcrun.niah.ruler.run import Answer, SuiteParams, prepare_suite, run_suite  # noqa: E402
from lcrun.param_types import parse_ctx  # noqa: E402


class CachingAnswerer:
    """Prefills what its cache lacks (the longest common prefix stays, as in llama.cpp), answers nothing."""

    def __init__(self) -> None:
        self.cache: list[int] = []

    def answer(self, prompt_tokens: list[int], max_tokens: int, *,
               on_prefill: Callable[[int, int], None] | None = None) -> Answer:
        keep = 0
        for a, b in zip(self.cache, prompt_tokens):
            if a != b:
                break
            keep += 1
        self.cache = list(prompt_tokens)
        return Answer("", len(prompt_tokens) - keep)


class CountingModel:
    @contextmanager
    def load(self, kv: KvType, n_ctx: int) -> Iterator[CachingAnswerer]:
        yield CachingAnswerer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF whose tokenizer and chat format to use")
    parser.add_argument("--lengths", default="8k,16k,32k")
    parser.add_argument("--kv", default="f16,q8_0")
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args()
    lengths = tuple(parse_ctx(x) for x in args.lengths.split(","))
    kv_types = tuple(KvType.parse(x) for x in args.kv.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tests.fixtures.realistic_gguf import write_realistic_gguf

            model = write_realistic_gguf(Path(tmp) / "llama3.gguf", "llama3")
        with Engine(EngineConfig(model_path=model, n_ctx=256, n_threads=1)) as engine:
            started = time.perf_counter()
            suite = prepare_suite(engine, engine_renderer(engine), read_haystack(),
                                  SuiteParams(lengths=lengths, kv_types=kv_types, samples=args.samples))
            with ResultsLog(Path(tmp) / "r.jsonl", {"bench": 1}, resume=False, force=False) as log:
                run_suite(CountingModel(), suite, log)
            seconds = time.perf_counter() - started
        print(f"{model.name}: {len(lengths)} lengths × {len(kv_types)} KV types × 6 tasks × {args.samples} "
              f"sample(s) = {len(log.done)} prompts; built in {seconds:.1f} s")
        print(f"{'length':>8} {'prompt tokens':>14} {'prefilled':>10} {'ratio':>6}")
        for ctx in lengths:
            mine = [r for r in log.done if r["ctx"] == ctx]
            prompt, prefilled = sum(r["prompt_tokens"] for r in mine), sum(r["prefilled_tokens"] for r in mine)
            print(f"{ctx:>8,} {prompt:>14,} {prefilled:>10,} {prompt / prefilled:>6.2f}")
        prompt = sum(r["prompt_tokens"] for r in log.done)
        prefilled = sum(r["prefilled_tokens"] for r in log.done)
        print(f"{'all':>8} {prompt:>14,} {prefilled:>10,} {prompt / prefilled:>6.2f}")


if __name__ == "__main__":
    main()
