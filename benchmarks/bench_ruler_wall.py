"""Wall time of the RULER-style suite on llama.cpp: the same grid (lengths × KV types × the six tasks) three ways,
the same prompts token for token, greedy answers with RULER's budgets, stopping at end-of-generation:

- `shared`:   lcrun's suite as `lcrun niah --suite ruler` runs it (niah.ruler.launched: the launch, one engine per KV
              type, the decode loop keeping what the sequence holds): a document is prefilled once for its questions;
- `unshared`: the same engines and loop, the sequence emptied before each prompt: every prompt prefilled whole;
- `llama`:    llama-cpp-python's `Llama` (same file, threads, context, KV types, flash attention and batch sizes as
              the engine the launch decided), the prompts one by one through `Llama.generate` — which keeps its
              longest common prefix too, so it shares the documents as the suite does.

Modes alternate within each round (the order rotates), and each reports its seconds and prefilled tokens; the
ratios are per round, then the median. The answers of the three must agree (all greedy on the same prompts).

    .venv/bin/python benchmarks/bench_ruler_wall.py --model qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --lengths 1k,1536,2k --kv f16,q8_0 --threads 2 --rounds 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcrun.chat.formats import engine_renderer  # noqa: E402  (the path is set just above)
from lcrun.kv_types import KvType  # noqa: E402
from lcrun.launch.decide import Launch, decide_launch  # noqa: E402
from lcrun.launch.loaded import open_model  # noqa: E402
from lcrun.launch.options import LaunchOptions  # noqa: E402
from lcrun.model_vocab import open_vocabulary  # noqa: E402
from lcrun.niah.haystack import read_haystack  # noqa: E402
from lcrun.niah.results import ResultsLog  # noqa: E402
from lcrun.niah.ruler.launched import LaunchedModel, LoopAnswerer, suite_launches  # noqa: E402
from lcrun.niah.ruler.run import Answer, Suite, SuiteParams, prepare_suite, run_suite  # noqa: E402
from lcrun.param_types import parse_ctx  # noqa: E402


class UnsharedAnswerer(LoopAnswerer):
    def answer(self, prompt_tokens: list[int], max_tokens: int, *,
               on_prefill: Callable[[int, int], None] | None = None) -> Answer:
        self.engine.seq_clear(0)
        return super().answer(prompt_tokens, max_tokens, on_prefill=on_prefill)


class UnsharedModel(LaunchedModel):
    @contextmanager
    def load(self, kv: KvType, n_ctx: int) -> Iterator[UnsharedAnswerer]:
        with open_model(self.launches[kv.label]) as model:
            yield UnsharedAnswerer(model.engine, self.seed)


class LlamaAnswerer:
    """`Llama.generate` prompt by prompt: greedy, at most max_tokens, stopping at end-of-generation."""

    def __init__(self, llm: Any) -> None:
        import llama_cpp

        self.llm = llm
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.is_eog = llama_cpp.llama_vocab_is_eog

    def answer(self, prompt_tokens: list[int], max_tokens: int, *,
               on_prefill: Callable[[int, int], None] | None = None) -> Answer:
        before = list(self.llm._input_ids[: self.llm.n_tokens])
        shared = 0
        for a, b in zip(before, prompt_tokens):
            if a != b:
                break
            shared += 1
        out: list[int] = []
        for token in self.llm.generate(prompt_tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0, reset=True):
            if self.is_eog(self.vocab, token):
                break
            out.append(token)
            if len(out) >= max_tokens:
                break
        # Llama re-evaluates the last prompt token when the whole prompt was cached
        prefilled = len(prompt_tokens) - min(shared, len(prompt_tokens) - 1)
        return Answer(self.llm.detokenize(out).decode("utf-8", "replace"), prefilled, len(out))


class LlamaModel:
    def __init__(self, launches: dict[str, Launch]) -> None:
        self.launches = launches

    @contextmanager
    def load(self, kv: KvType, n_ctx: int) -> Iterator[LlamaAnswerer]:
        import llama_cpp
        from gguf import GGMLQuantizationType  # its values are ggml_type's, as the engine uses them

        from tests.fixtures.llama_peer import match_engine_weights

        match_engine_weights()  # the engine's weight repacking (no AMX: ggml-org/llama.cpp#20824)
        c = self.launches[kv.label].config
        llm = llama_cpp.Llama(
            model_path=str(c.model_path), n_ctx=c.n_ctx, n_gpu_layers=c.n_gpu_layers,
            n_batch=512, n_ubatch=c.n_ubatch,   # the loop prefills in chunks of 512; Llama.eval in n_batch ones
            n_threads=c.n_threads, n_threads_batch=c.n_threads_batch or os.cpu_count() or 1, seed=0,  # as the engine
            flash_attn=c.flash_attn, type_k=int(GGMLQuantizationType[c.type_k.upper()]),
            type_v=int(GGMLQuantizationType[c.type_v.upper()]), logits_all=False, verbose=False)
        try:
            yield LlamaAnswerer(llm)
        finally:
            llm.close()


def run_mode(model: Any, suite: Suite, folder: Path, name: str) -> dict[str, Any]:
    with ResultsLog(folder / f"{name}.jsonl", {"bench": name}, resume=False, force=True) as log:
        started = time.perf_counter()
        run_suite(model, suite, log)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "prefilled": sum(r["prefilled_tokens"] for r in log.done),
            "prompt": sum(r["prompt_tokens"] for r in log.done),
            "answers": {(r["kv"], r["ctx"], r["task"], r["sample"]): r["answer"].strip() for r in log.done},
            "scores": [r["score"] for r in log.done]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--lengths", default="1k,1536,2k")
    parser.add_argument("--kv", default="f16,q8_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default="shared,llama,unshared")
    parser.add_argument("--json", type=Path, help="write the per-round figures here")
    args = parser.parse_args()
    lengths = tuple(parse_ctx(x) for x in args.lengths.split(","))
    kv_types = tuple(KvType.parse(x) for x in args.kv.split(","))
    params = SuiteParams(lengths=lengths, kv_types=kv_types, samples=args.samples)
    launch = decide_launch(LaunchOptions(model=str(args.model), threads=args.threads, ctx=params.n_ctx))
    launches = suite_launches(launch, kv_types, params.n_ctx)
    for kv, decided in launches.items():
        c = decided.config
        print(f"KV {kv}: n_ctx {c.n_ctx}, flash attention {c.flash_attn}, threads {c.n_threads}, "
              f"ubatch {c.n_ubatch}", file=sys.stderr)
    models = {"shared": LaunchedModel(launches), "unshared": UnsharedModel(launches), "llama": LlamaModel(launches)}
    modes = args.modes.split(",")
    rounds: list[dict[str, Any]] = []
    with open_vocabulary(str(args.model)) as vocabulary, tempfile.TemporaryDirectory() as tmp:
        suite = prepare_suite(vocabulary, engine_renderer(vocabulary, launch.chat_format), read_haystack(), params)
        for n in range(args.rounds):
            order = modes[n % len(modes):] + modes[: n % len(modes)]
            got = {}
            for mode in order:
                got[mode] = run_mode(models[mode], suite, Path(tmp), mode)
                print(f"round {n + 1} {mode}: {got[mode]['seconds']:.1f} s, prefilled {got[mode]['prefilled']:,} "
                      f"of {got[mode]['prompt']:,} prompt tokens", file=sys.stderr, flush=True)
            agree = {m: sum(got[m]["answers"][k] == got[modes[0]]["answers"][k] for k in got[modes[0]]["answers"])
                     for m in modes}
            rounds.append({"order": order, **{m: {k: v for k, v in got[m].items() if k != "answers"} for m in modes},
                           "answers_agreeing_with_" + modes[0]: agree})
    print(f"{args.model.name}: lengths {args.lengths}, KV {args.kv}, {args.samples} sample(s), threads {args.threads}")
    for mode in modes:
        seconds = statistics.median(r[mode]["seconds"] for r in rounds)
        print(f"{mode:>9}: {seconds:8.1f} s (median of {len(rounds)}), prefilled {rounds[-1][mode]['prefilled']:,}")
    for other in modes[1:]:
        ratio = statistics.median(r[other]["seconds"] / r[modes[0]]["seconds"] for r in rounds)
        print(f"{other} / {modes[0]}: {ratio:.2f}× the time")
    print("answers agreeing:", rounds[-1]["answers_agreeing_with_" + modes[0]])
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
