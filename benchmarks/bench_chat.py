"""The chat's quality bars, measured through the path `lcrun chat` takes (launch plan → Engine → ChatSession → the
decode loop) against llama-cpp-python called directly with the same settings — and, with --base, against another
lcrun checkout (the previous main) — interleaved.

    .venv/bin/python benchmarks/bench_chat.py [--models demo,mid] [--mid GGUF] [--rounds N] [--gen-tokens N]
        [--doc-tokens N] [--threads N] [--base CHECKOUT] [--skip-document] [--json OUT]

Three figures per model:

1. Generation speed (target: lcrun / direct >= 0.98). Each side in a process of its own (benchmarks/gen_side.py:
   two lcrun versions cannot share one): lcrun generating through lcrun.generation's decode loop, the --base checkout
   through its own engine, `Llama.generate(prompt, temp=0)` for direct; N greedy tokens, timed as a front end sees
   them, from the first token's text to the N-th's (N-1 decodes and N-1 samples on every side). Same prompt tokens,
   same cache state (emptied before each run); the N tokens of every side must be equal (same settings).
2. Follow-up time to first token (target: <= 5 % of the first turn). A fresh ChatSession on the real Engine: add a
   long document (`ChatSession.check_document` + `add_document`, as `--file` and `/file` do: render, tokenize,
   prefill), ask a question (first turn = document add + its TTFT), ask a follow-up (its TTFT, from the Finished
   record: the cached prefix is reused, only the previous reply and the new question are evaluated).
3. Document prefill speed (target: lcrun / direct >= 0.97). lcrun: the wall time of `add_document` above, chat
   overheads included (rendering the conversation, tokenizing it, chunked Engine.prefill); direct: `Llama.eval` of
   exactly the tokens the session prefilled, cache emptied first (`Llama.reset`).

Each round runs lcrun and direct one after the other, alternating which goes first, so drift in a shared machine falls
on both alike; the table shows medians (and min-max) over the rounds. Models: `demo` (the built-in tiny model) and
`mid` (a Llama-3.1-shaped Q8_0, hidden 1024, 8 layers, vocabulary 128256: bench-work/mid-q8_0.gguf if present, else
bench-work/ckpt converted once to bench-work/chat-mid-q8_0.gguf).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lcrun.chat.session import ChatSession
from lcrun.engine.protocol import GREEDY
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.generation.drive import prefill
from lcrun.generation.records import Finished, GenerationParams
from lcrun.launch.decide import Launch, decide_launch
from lcrun.launch.model_file import demo_gguf
from lcrun.launch.options import LaunchOptions

REPO = Path(__file__).resolve().parent.parent
BENCH_WORK = REPO / "bench-work"
GEN_PROMPT = ("You are a careful assistant. Explain, step by step and with examples, how a lighthouse keeper in the "
              "nineteenth century kept the lamp burning through a winter storm, what could go wrong, and why it "
              "mattered to the ships that passed.")
QUESTION = "Summarise the document above in three sentences."
FOLLOW_UP = "Which of the people mentioned in it would you most like to meet, and why?"


@dataclass(frozen=True)
class ModelSetup:
    name: str
    path: Path
    ctx: int
    doc_tokens: int
    gen_tokens: int
    reply_tokens: int


def mid_model() -> Path | None:
    """bench-work/mid-q8_0.gguf (another benchmark's conversion) or our own from bench-work/ckpt."""
    shared = BENCH_WORK / "mid-q8_0.gguf"
    if shared.is_file():
        return shared
    own = BENCH_WORK / "chat-mid-q8_0.gguf"
    if own.is_file():
        return own
    if not (BENCH_WORK / "ckpt" / "config.json").is_file():
        return None
    from lcrun.convert.convert import convert_checkpoint

    print(f"converting {BENCH_WORK / 'ckpt'} to {own} (q8_0) …", file=sys.stderr)
    return convert_checkpoint(BENCH_WORK / "ckpt", own, outtype="q8_0").paths[0]


def direct_llama(config: EngineConfig) -> Any:
    """llama-cpp-python with exactly the settings Engine passes (see lcrun.engine.runtime.Engine.__init__)."""
    import llama_cpp
    from gguf import GGMLQuantizationType  # its values are ggml_type's, as the engine uses them

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fixtures.llama_peer import match_engine_weights

    match_engine_weights()  # the engine's weight repacking (no AMX: ggml-org/llama.cpp#20824)

    return llama_cpp.Llama(
        model_path=str(config.model_path), n_ctx=config.n_ctx, n_gpu_layers=config.n_gpu_layers,
        n_batch=config.n_batch, n_ubatch=config.n_ubatch, n_threads=config.n_threads, seed=0,
        flash_attn=config.flash_attn, type_k=int(GGMLQuantizationType[config.type_k.upper()]),
        type_v=int(GGMLQuantizationType[config.type_v.upper()]),
        rope_freq_base=config.rope_freq_base or 0.0, rope_freq_scale=config.rope_freq_scale or 0.0,
        yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0, logits_all=False, verbose=False,
    )


# -- the document -----------------------------------------------------------------------------------------------
_PEOPLE = ["the keeper", "the harbour master", "a young clerk", "the surveyor", "an old fisherman", "the engineer",
           "the schoolteacher", "a travelling merchant", "the ferryman", "the archivist"]
_THINGS = ["the lamp", "the ledger", "the tide tables", "a brass telescope", "the fog bell", "the supply boat",
           "the stone stairs", "a bundle of letters", "the weather glass", "the coal store", "the chart room"]
_VERBS = ["checked", "repaired", "described", "carried", "forgot", "measured", "polished", "counted", "argued about",
          "wrote down", "waited for", "mended"]
_PLACES = ["on the headland", "in the village", "beside the quay", "at the top of the tower", "behind the chapel",
           "along the cliff path", "in the boathouse"]
_LINKS = ["Later that week,", "Even so,", "Meanwhile,", "By the next spring,", "For the most part,",
          "As the records show,", "Nobody remembered why, but"]


def make_document(rng: random.Random, count: Callable[[str], int], target_tokens: int) -> str:
    """Plain prose, seeded, grown paragraph by paragraph until it tokenizes to at least `target_tokens`."""
    paragraphs: list[str] = []
    while True:
        sentences = []
        for _ in range(rng.randint(4, 8)):
            sentence = (f"{rng.choice(_PEOPLE)} {rng.choice(_VERBS)} {rng.choice(_THINGS)} {rng.choice(_PLACES)}"
                        f" while {rng.choice(_PEOPLE)} {rng.choice(_VERBS)} {rng.choice(_THINGS)}.")
            if rng.random() < 0.4:
                sentence = f"{rng.choice(_LINKS)} {sentence}"
            sentences.append(sentence[0].upper() + sentence[1:])
        paragraphs.append(" ".join(sentences))
        if count("\n\n".join(paragraphs)) >= target_tokens:
            return "\n\n".join(paragraphs)


# -- 1. generation, each side in its own process ---------------------------------------------------------------
class Side:
    """benchmarks/gen_side.py for one side, loaded and waiting for commands."""

    def __init__(self, name: str, python: str, cwd: Path, kind: str, config: EngineConfig) -> None:
        self.name = name
        cmd = [python, str(Path(__file__).resolve().parent / "gen_side.py"), kind, str(Path(config.model_path).resolve()),
               "--ctx", str(config.n_ctx), "--threads", str(config.n_threads), "--n-batch", str(config.n_batch),
               "--n-ubatch", str(config.n_ubatch)] + (["--flash-attn"] if config.flash_attn else [])
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"{name}: the side process did not start")

    def gen(self, prompt: list[int], n: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": "gen", "prompt": prompt, "n": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(60)


def gen_sides(config: EngineConfig, base: Path | None) -> list[Side]:
    sides = [Side("lcrun", sys.executable, REPO, "lcrun", config)]
    if base is not None:
        sides.append(Side("base", str(base / ".venv" / "bin" / "python"), base, "lcrun", config))
    sides.append(Side("direct", sys.executable, REPO, "direct", config))
    return sides


# -- 2 and 3. a long document, two turns ------------------------------------------------------------------------
def empty_cache(engine: Engine, token: int) -> None:
    """A one-token prompt that shares no prefix with the cache drops the whole cache."""
    list(prefill(engine, [token]))


def doc_lcrun(engine: Engine, document: Path, reply_tokens: int, other: int) -> tuple[dict[str, Any], list[int]]:
    empty_cache(engine, other)
    session = ChatSession(engine, params=GenerationParams(GREEDY, max_tokens=reply_tokens), history=None,
                          model_name="bench")
    started = time.perf_counter()
    check = session.check_document(document)
    checked = time.perf_counter()
    for _ in session.add_document(check):
        pass
    added = time.perf_counter()
    prefilled = engine.cached_tokens
    turns = []
    for question in (QUESTION, FOLLOW_UP):
        finished = None
        for event in session.ask(question):
            if isinstance(event, Finished):
                finished = event
        assert finished is not None
        turns.append(finished)
    first, second = turns
    result = {
        "document_tokens": len(prefilled), "check_s": checked - started, "add_s": added - checked,
        "prefill_tok_s": len(prefilled) / (added - checked),
        "ttft1_s": first.time_to_first_token_s, "first_turn_s": (added - started) + first.time_to_first_token_s,
        "ttft2_s": second.time_to_first_token_s,
        "turn1": {"prompt": first.prompt_tokens, "reused": first.reused_tokens, "reply": first.completion_tokens,
                  "reason": first.reason},
        "turn2": {"prompt": second.prompt_tokens, "reused": second.reused_tokens, "reply": second.completion_tokens,
                  "reason": second.reason},
    }
    result["follow_up_ratio"] = result["ttft2_s"] / result["first_turn_s"]
    return result, prefilled


def doc_direct(llm: Any, tokens: list[int]) -> dict[str, float]:
    llm.reset()
    started = time.perf_counter()
    llm.eval(tokens)
    elapsed = time.perf_counter() - started
    return {"prefill_s": elapsed, "prefill_tok_s": len(tokens) / elapsed}


# -- running ----------------------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_model(setup: ModelSetup, rounds: int, threads: int | None, workdir: Path, base: Path | None,
                document_too: bool) -> dict[str, Any]:
    launch: Launch = decide_launch(LaunchOptions(str(setup.path), ctx=setup.ctx, threads=threads))
    config = launch.config
    print(f"[{setup.name}] {setup.path.name}: ctx {config.n_ctx}, KV {config.type_k}/{config.type_v}, flash "
          f"{config.flash_attn}, n_batch {config.n_batch}, n_ubatch {config.n_ubatch}, threads "
          f"{config.n_threads or 'default'}", file=sys.stderr)
    with Engine(replace(config, n_ctx=256)) as vocab_only:
        prompt = vocab_only.tokenize(GEN_PROMPT, add_bos=True)

    sides = gen_sides(config, base)
    gen: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    same_tokens = True
    try:
        for side in sides:  # untimed warm-up of every side (first-touch of the weights, thread pools)
            side.gen(prompt, 8)
        for r in range(rounds):
            order = sides[r % len(sides):] + sides[: r % len(sides)]
            got = {}
            for side in order:
                figures = side.gen(prompt, setup.gen_tokens)
                got[side.name] = figures.pop("tokens")
                gen[side.name].append(figures)
            same_tokens &= len({tuple(t) for t in got.values()}) == 1
            print(f"[{setup.name}] gen round {r + 1}: " + ", ".join(
                f"{name} {runs[-1]['tok_s']:.1f} tok/s" for name, runs in gen.items()), file=sys.stderr)
    finally:
        for side in sides:
            side.close()

    def ratio(a: str, b: str) -> list[float]:
        return [x["tok_s"] / y["tok_s"] for x, y in zip(gen[a], gen[b])]

    result: dict[str, Any] = {
        "model": setup.name, "file": str(setup.path), "file_bytes": setup.path.stat().st_size,
        "config": {k: str(v) for k, v in config.__dict__.items()},
        "gen_tokens": setup.gen_tokens, "prompt_tokens": len(prompt), "same_tokens": same_tokens,
        "gen_tok_s": {name: summary([g["tok_s"] for g in runs]) for name, runs in gen.items()},
        "gen_ratio": summary(ratio("lcrun", "direct")),
        "runs": {"gen": gen},
    }
    if base is not None:
        result["base_gen_ratio"] = summary(ratio("base", "direct"))
        result["lcrun_vs_base"] = summary(ratio("lcrun", "base"))
    if document_too:
        result.update(bench_document(setup, config, rounds, workdir))
    return result


def bench_document(setup: ModelSetup, config: EngineConfig, rounds: int, workdir: Path) -> dict[str, Any]:
    engine = Engine(config)
    llm = direct_llama(config)
    try:
        other = engine.tokenize("Zebra")[0]
        rng = random.Random(f"bench-chat-{setup.name}")
        document = workdir / f"{setup.name}-document.txt"
        document.write_text(make_document(rng, lambda text: len(engine.tokenize(text)), setup.doc_tokens),
                            encoding="utf-8")
        doc: dict[str, list[dict[str, Any]]] = {"lcrun": [], "direct": []}
        prefilled: list[int] = []  # what the session prefills: the same every round (round 1 runs lcrun first)
        for r in range(rounds):
            order = ("lcrun", "direct") if r % 2 == 0 else ("direct", "lcrun")
            for side in order:
                if side == "lcrun":
                    result, tokens = doc_lcrun(engine, document, setup.reply_tokens, other)
                    assert not prefilled or tokens == prefilled
                    prefilled = tokens
                    doc["lcrun"].append(result)
                else:
                    doc["direct"].append(doc_direct(llm, prefilled))
            print(f"[{setup.name}] document round {r + 1}: lcrun {doc['lcrun'][-1]['prefill_tok_s']:.0f} tok/s, "
                  f"direct {doc['direct'][-1]['prefill_tok_s']:.0f} tok/s; first turn "
                  f"{doc['lcrun'][-1]['first_turn_s']:.2f} s, follow-up TTFT {doc['lcrun'][-1]['ttft2_s']:.3f} s",
                  file=sys.stderr)
    finally:
        engine.close()
        llm.close()
    prefill_ratio = [a["prefill_tok_s"] / b["prefill_tok_s"] for a, b in zip(doc["lcrun"], doc["direct"])]
    return {
        "document_tokens": doc["lcrun"][0]["document_tokens"],
        "prefill_tok_s": {"lcrun": summary([d["prefill_tok_s"] for d in doc["lcrun"]]),
                          "direct": summary([d["prefill_tok_s"] for d in doc["direct"]])},
        "prefill_ratio": summary(prefill_ratio),
        "first_turn_s": summary([d["first_turn_s"] for d in doc["lcrun"]]),
        "ttft1_s": summary([d["ttft1_s"] for d in doc["lcrun"]]),
        "ttft2_s": summary([d["ttft2_s"] for d in doc["lcrun"]]),
        "follow_up_ratio": summary([d["follow_up_ratio"] for d in doc["lcrun"]]),
        "document_runs": doc,
    }


def _range(s: dict[str, float], fmt: str) -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def markdown(results: list[dict[str, Any]], rounds: int) -> str:
    lines = [
        f"| model | measure | lcrun | llama-cpp-python | ratio (median, min–max over {rounds} rounds) | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r["model"]
        ok = "✅" if r["gen_ratio"]["median"] >= 0.98 else "❌"
        lines.append(f"| {name} | generation, {r['gen_tokens']} tokens greedy (tok/s) | "
                     f"{_range(r['gen_tok_s']['lcrun'], '.1f')} | {_range(r['gen_tok_s']['direct'], '.1f')} | "
                     f"{_range(r['gen_ratio'], '.3f')} | ≥ 0.98 {ok} |")
        if "base" in r["gen_tok_s"]:
            ok = "✅" if r["lcrun_vs_base"]["median"] >= 0.98 else "❌"
            lines.append(f"| {name} | generation, the previous main (--base) | "
                         f"{_range(r['gen_tok_s']['base'], '.1f')} | {_range(r['gen_tok_s']['direct'], '.1f')} | "
                         f"{_range(r['base_gen_ratio'], '.3f')}; lcrun / previous main "
                         f"{_range(r['lcrun_vs_base'], '.3f')} | not below {ok} |")
        if "prefill_ratio" not in r:
            continue
        ok = "✅" if r["prefill_ratio"]["median"] >= 0.97 else "❌"
        lines.append(f"| {name} | document prefill, {r['document_tokens']:,} tokens (tok/s) | "
                     f"{_range(r['prefill_tok_s']['lcrun'], ',.0f')} | {_range(r['prefill_tok_s']['direct'], ',.0f')} "
                     f"| {_range(r['prefill_ratio'], '.3f')} | ≥ 0.97 {ok} |")
        ok = "✅" if r["follow_up_ratio"]["median"] <= 0.05 else "❌"
        lines.append(f"| {name} | follow-up TTFT / first turn (document add + TTFT) | "
                     f"{_range(r['ttft2_s'], '.3f')} s / {_range(r['first_turn_s'], '.2f')} s | — | "
                     f"{_range(r['follow_up_ratio'], '.4f')} | ≤ 0.05 {ok} |")
        turn1, turn2 = r["document_runs"]["lcrun"][0]["turn1"], r["document_runs"]["lcrun"][0]["turn2"]
        lines.append(f"| {name} | TTFT of the first question / of the follow-up (new tokens evaluated) | "
                     f"{_range(r['ttft1_s'], '.3f')} s ({turn1['prompt'] - turn1['reused']}) / "
                     f"{_range(r['ttft2_s'], '.3f')} s ({turn2['prompt'] - turn2['reused']}) | — | — | — |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import llama_cpp
    import psutil

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "load_avg_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,mid", help="comma-separated: demo, mid (default: both)")
    parser.add_argument("--mid", type=Path, help="the mid-size GGUF (default: see the module docstring)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads for both sides (default: the plan's)")
    parser.add_argument("--gen-tokens", type=int, help="tokens generated per run (default: demo 1024, mid 96)")
    parser.add_argument("--doc-tokens", type=int, help="document size (default: demo 12000, mid 6000)")
    parser.add_argument("--base", type=Path, metavar="CHECKOUT",
                        help="another lcrun checkout (with its .venv) to measure beside this one: the previous main")
    parser.add_argument("--skip-document", action="store_true", help="generation only")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args(argv)

    setups = []
    for name in args.models.split(","):
        if name == "demo":
            doc = args.doc_tokens or 12000
            setups.append(ModelSetup("demo", demo_gguf(), ctx=doc + 4096, doc_tokens=doc,
                                     gen_tokens=args.gen_tokens or 1024, reply_tokens=64))
        elif name == "mid":
            path = args.mid or mid_model()
            if path is None:
                print("mid: no bench-work/mid-q8_0.gguf and no bench-work/ckpt to convert (run "
                      "benchmarks/make_bench_checkpoint.py bench-work/ckpt); skipped", file=sys.stderr)
                continue
            doc = args.doc_tokens or 6000
            setups.append(ModelSetup("mid", path, ctx=doc + 2048, doc_tokens=doc,
                                     gen_tokens=args.gen_tokens or 96, reply_tokens=32))
        else:
            parser.error(f"--models: unknown model {name!r} (demo, mid)")

    info = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        results = [bench_model(s, args.rounds, args.threads, Path(tmp), args.base, not args.skip_document)
                   for s in setups]
    table = markdown(results, args.rounds)
    print(table)
    for r in results:
        if not r["same_tokens"]:
            print(f"note: {r['model']}: the sides generated different tokens (settings differ?)")
    print(f"\n{info['cpus']} CPUs, {info['memory_gib']} GiB, Python {info['python']}, llama-cpp-python "
          f"{info['llama_cpp_python']}, load average at start {info['load_avg_at_start'][0]:.2f}, at the end "
          f"{os.getloadavg()[0]:.2f}; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv[1:], "results": results,
                                         "markdown": table}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
