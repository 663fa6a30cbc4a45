"""Prompt processing (pp) and generation (tg) speed through lcrun's Engine against llama-cpp-python called directly
with the same settings, at several KV cache depths, interleaved.

    .venv/bin/python benchmarks/bench_runtime.py MODEL [--depth N ...] [--pp 512] [--tg 128] [--rounds 5]
        [--threads N] [--kv-type f16] [--flash-attn on|off] [--json OUT]

MODEL is a GGUF path or `demo`. The plan is `lcrun bench`'s (lcrun.bench.set_up_bench: the context sized to the
deepest measurement, KV type and flash attention from the planner unless forced); both sides get its settings:
n_ctx, n_batch, n_ubatch, threads, flash_attn, type_k/type_v, YaRN -1 (the GGUF's values), no logits_all.

- lcrun: lcrun.bench.measure, i.e. what `lcrun bench` times: a request through lcrun.generation's decode loop of the
  cached depth plus `pp` new tokens (prefill in n_batch chunks) and `tg` greedy tokens decoded with ignore_eos;
  pp = start to the last prefill step, tg = from there to the end (sampler set-up, tg + 1 samples, tg decodes,
  detokenization).
- direct: `Llama.n_tokens = depth` (Llama.eval drops the cache from there on), pp = `Llama.eval(prompt)`; tg =
  `Llama.generate([], temp=0.0, reset=False)` for `tg` tokens plus the eval of the last one, so both sides do tg
  samples and tg decodes.

Both load the same file at the same time and see the same tokens (lcrun.bench.bench_tokens). Each depth's cache is
filled once per side (untimed); then each round measures lcrun and direct, alternating which goes first, after one
untimed warm-up each. The table shows medians over the rounds (and min–max); ratio = lcrun / direct.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcrun.bench import bench_tokens, fill_cache, measure, prompt_after, set_up_bench
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.launch.decide import decide_launch
from lcrun.launch.options import LaunchOptions

PROMPT_SPARE = 64


def direct_llama(config: EngineConfig) -> Any:
    import llama_cpp
    from gguf import GGMLQuantizationType  # its values are ggml_type's, as the engine uses them

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fixtures.llama_peer import match_engine_weights

    match_engine_weights()  # the engine's weight repacking (no AMX: ggml-org/llama.cpp#20824)

    def ggml_type(name: str) -> int:
        return int(GGMLQuantizationType[name.upper()])

    return llama_cpp.Llama(
        model_path=str(config.model_path), n_ctx=config.n_ctx, n_gpu_layers=config.n_gpu_layers,
        n_batch=config.n_batch, n_ubatch=config.n_ubatch, n_threads=config.n_threads, seed=0,
        flash_attn=config.flash_attn, type_k=ggml_type(config.type_k), type_v=ggml_type(config.type_v),
        rope_freq_base=config.rope_freq_base or 0.0, rope_freq_scale=config.rope_freq_scale or 0.0,
        yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0, logits_all=False, verbose=False,
    )


def direct_measure(llm: Any, depth: int, prompt: list[int], tg: int,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    llm.n_tokens = depth
    start = clock()
    llm.eval(prompt)
    prefilled = clock()
    if tg:
        tokens = llm.generate([], temp=0.0, repeat_penalty=1.0, reset=False)
        for i, token in enumerate(tokens):
            if i + 1 == tg:
                break
        tokens.close()
        llm.eval([token])
    end = clock()
    return prefilled - start, end - prefilled


def direct_fill(llm: Any, stream: list[int], filled: int, depth: int) -> None:
    """Extend the cache from the `filled` tokens it holds to `depth` (or cut it back)."""
    keep = min(filled, depth)
    llm.n_tokens = keep
    if depth > keep:
        llm.eval(stream[keep:depth])


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> dict[str, Any]:
    import llama_cpp

    import lcrun

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / (1 << 20), 1),
            "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
            "lcrun": lcrun.__version__, "platform": platform.platform()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    launch = decide_launch(LaunchOptions(args.model, threads=args.threads, kv_type=args.kv_type,
                                         flash_attn=args.flash_attn, chat=False))
    path = launch.model_path
    setup = set_up_bench(launch, args.depth, pp=args.pp, tg=args.tg, repetitions=args.rounds)
    config = setup.launch.config
    depths = setup.depths
    engine = Engine(config)
    llm = direct_llama(config)
    load_before = os.getloadavg()
    samples: dict[int, dict[str, dict[str, list[float]]]] = {}
    try:
        base = max(depths)
        stream = bench_tokens(engine, base + PROMPT_SPARE + args.pp)
        warm = prompt_after(engine, stream, 0, base, min(args.pp, 128))
        measure(engine, [], warm, min(args.tg, 2), batch=config.n_batch)
        direct_measure(llm, 0, warm, min(args.tg, 2))
        direct_filled = 0
        for depth in depths:
            context = stream[:depth]
            started = time.perf_counter()
            fill_cache(engine, context, batch=config.n_batch)
            direct_fill(llm, stream, direct_filled, depth)
            direct_filled = depth
            print(f"depth {depth:,}: filled both caches in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            got = samples[depth] = {side: {"pp": [], "tg": []} for side in ("lcrun", "direct")}
            for round_ in range(args.rounds):
                prompt = prompt_after(engine, stream, depth, base, args.pp)
                for side in (("lcrun", "direct") if round_ % 2 == 0 else ("direct", "lcrun")):
                    if side == "lcrun":
                        rep = measure(engine, context, prompt, args.tg, batch=config.n_batch)
                        pp_s, tg_s = rep.pp_s, rep.tg_s
                    else:
                        pp_s, tg_s = direct_measure(llm, depth, prompt, args.tg)
                    got[side]["pp"].append(args.pp / pp_s)
                    if args.tg:
                        got[side]["tg"].append(args.tg / tg_s)
                print(f"depth {depth:,} round {round_ + 1}/{args.rounds}: " + ", ".join(
                    f"{side} pp {got[side]['pp'][-1]:,.1f} tg {got[side]['tg'][-1] if args.tg else 0:,.2f}"
                    for side in ("lcrun", "direct")), file=sys.stderr)
    finally:
        engine.close()
        llm.close()
    results = []
    for depth in depths:
        row: dict[str, Any] = {"depth": depth}
        for metric in ("pp", "tg") if args.tg else ("pp",):
            ours, theirs = (summary(samples[depth][side][metric]) for side in ("lcrun", "direct"))
            row[metric] = {"lcrun": ours, "direct": theirs, "ratio": ours["median"] / theirs["median"],
                           "samples": {side: samples[depth][side][metric] for side in ("lcrun", "direct")}}
        results.append(row)
    return {
        "model": path.name, "file_type": setup.launch.spec.file_type, "machine": machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": {"n_ctx": config.n_ctx, "n_batch": config.n_batch, "n_ubatch": config.n_ubatch,
                     "n_threads": config.n_threads, "flash_attn": config.flash_attn, "type_k": config.type_k,
                     "type_v": config.type_v, "n_gpu_layers": config.n_gpu_layers},
        "pp": args.pp, "tg": args.tg, "rounds": args.rounds, "command": " ".join(sys.argv), "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:,.1f} ({s['min']:,.1f}–{s['max']:,.1f})"

    pp, tg = report["pp"], report["tg"]
    lines = [f"| model | depth | pp{pp} lcrun t/s | pp{pp} direct t/s | pp ratio | tg{tg} lcrun t/s "
             f"| tg{tg} direct t/s | tg ratio |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in report["results"]:
        t = row.get("tg")
        tg_cells = f"{cell(t['lcrun'])} | {cell(t['direct'])} | {t['ratio']:.3f}" if t else "- | - | -"
        lines.append(f"| {report['model']} ({report['file_type']}) | {row['depth']:,} | {cell(row['pp']['lcrun'])} "
                     f"| {cell(row['pp']['direct'])} | {row['pp']['ratio']:.3f} | {tg_cells} |")
    s = report["settings"]
    lines.append("")
    lines.append(f"n_ctx {s['n_ctx']:,}, KV {s['type_k']}/{s['type_v']}, flash attention "
                 f"{'on' if s['flash_attn'] else 'off'}, threads {s['n_threads'] or 'auto'}, batch "
                 f"{s['n_batch']}/{s['n_ubatch']}; medians of {report['rounds']} interleaved rounds (min–max); "
                 f"load average {report['load_average']['before'][0]:.2f} → {report['load_average']['after'][0]:.2f}")
    return "\n".join(lines)


def main() -> None:
    from lcrun.param_types import parse_ctx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file or `demo`")
    parser.add_argument("--depth", type=parse_ctx, action="append", default=[],
                        help="KV cache depth (repeatable; default: lcrun bench's ladder)")
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--kv-type")
    parser.add_argument("--flash-attn", choices=["on", "off", "auto"], default="auto")
    parser.add_argument("--json", type=Path, help="write the report (every sample) here")
    args = parser.parse_args()
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
