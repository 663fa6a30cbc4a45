"""What ggml's RPC protocol costs: prompt processing (pp) and generation (tg) tokens/s of one model run locally
against the same model split over this process and two `lcrun worker` processes on 127.0.0.1, interleaved.

    .venv/bin/python benchmarks/bench_rpc.py MODEL [--depth N ...] [--pp 512] [--tg 64] [--rounds 5]
        [--threads 1] [--flash-attn off|on] [--json OUT]

Both sides are lcrun's Engine as `lcrun bench` drives it (lcrun.bench.measure: the cached depth plus `pp` new tokens
prefilled in n_batch chunks, then `tg` greedy tokens with ignore_eog), with the same context, KV type, flash
attention and thread count. The split side is planned as `--rpc` plans it (layers over this machine and the workers
in proportion to their free memory) and loaded with the plan's device list and tensor split; the local side has no
devices. Over loopback the network is nearly free, so the ratio split / local is the protocol's own overhead: the
per-token round trips, the activations copied between devices, the graph sent to each worker.

Every process computes one part of the graph while the others wait, so with `--threads N` each of the three uses N
threads; on a small machine keep N x 3 at or below the cores (ggml's idle CPU threads spin for a while, and
oversubscribed spinning threads cost more than the protocol). The workers are started and stopped here.

Beside wall-clock tokens/s, each phase's CPU time is recorded: this process's, plus the workers' for the split run
(user + system, from /proc). On a machine shared with other work, wall-clock ratios are skewed by the scheduler
(three processes that take turns and sleep in between are woken ahead of busy ones); the CPU time per token is not,
and split / local CPU time is the work the protocol adds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from lcrun.bench import bench_tokens, fill_cache, measure, prompt_after
from lcrun.engine import rpc
from lcrun.engine.runtime import Engine
from lcrun.launch.decide import decide_launch
from lcrun.launch.model_file import find_model_file
from lcrun.launch.options import LaunchOptions

PROMPT_SPARE = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lcrun.cli", "worker", "--port", str(port), "--threads",
                             str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            rpc.probe(endpoint, timeout=1.0)
            return proc, endpoint
        except rpc.WorkerError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker on {endpoint} did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)


class CpuRecordingClock:
    """A wall clock for lcrun.bench.measure (called at the start, when the prefill is done, at the end) that also
    notes the CPU seconds the given processes have used at each call."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self.cpu: list[float] = []

    def __call__(self) -> float:
        self.cpu.append(sum(sum(p.cpu_times()[:2]) for p in self.processes))
        return time.perf_counter()

    def phases(self) -> tuple[float, float]:
        start, prefilled, end = self.cpu
        return prefilled - start, end - prefilled


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> dict[str, Any]:
    import llama_cpp

    import lcrun

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "lcrun": lcrun.__version__, "platform": platform.platform()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = find_model_file(args.model)
    depths = sorted(set(args.depth or [0]))
    n_ctx = -(-(max(depths) + PROMPT_SPARE + args.pp + args.tg) // 256) * 256
    base = LaunchOptions(str(path), ctx=n_ctx, threads=args.threads, flash_attn=args.flash_attn, kv_type="f16")
    workers = [start_worker(args.threads) for _ in range(2)]
    endpoints = tuple(endpoint for _, endpoint in workers)
    engines: dict[str, Engine] = {}
    me = psutil.Process()
    worker_procs = [psutil.Process(proc.pid) for proc, _ in workers]
    samples: dict[int, dict[str, dict[str, list[float]]]] = {}
    load_before = os.getloadavg()
    try:
        local = decide_launch(base)
        split = decide_launch(replace(base, rpc=endpoints))
        placement = [{"host": d.host or "this machine", "device": d.name, "layers": d.layers,
                      "output_layer": d.output_layer, "bytes": d.bytes} for d in split.choice.estimate.devices]
        print("split: " + ", ".join(f"{p['host']} {p['layers']} layers{' + output' if p['output_layer'] else ''}"
                                    for p in placement), file=sys.stderr)
        engines = {"local": Engine(local.config), "split": Engine(split.config)}
        batch = local.config.n_batch
        stream = bench_tokens(engines["local"], max(depths) + PROMPT_SPARE + args.pp)
        for engine in engines.values():  # warm-up
            measure(engine, [], prompt_after(engine, stream, 0, max(depths), min(args.pp, 128)), 2, batch=batch)
        for depth in depths:
            context = stream[:depth]
            for engine in engines.values():
                fill_cache(engine, context, batch=batch)
            got = samples[depth] = {side: {"pp": [], "tg": [], "pp_cpu_ms": [], "tg_cpu_ms": []} for side in engines}
            for round_ in range(args.rounds):
                for side in (("local", "split") if round_ % 2 == 0 else ("split", "local")):
                    engine = engines[side]
                    clock = CpuRecordingClock([me] if side == "local" else [me, *worker_procs])
                    rep = measure(engine, context, prompt_after(engine, stream, depth, max(depths), args.pp),
                                  args.tg, batch=batch, clock=clock)
                    got[side]["pp"].append(rep.pp_tokens / rep.pp_s)
                    got[side]["tg"].append(rep.tg_tokens / rep.tg_s)
                    pp_cpu, tg_cpu = clock.phases()
                    got[side]["pp_cpu_ms"].append(1000 * pp_cpu / rep.pp_tokens)
                    got[side]["tg_cpu_ms"].append(1000 * tg_cpu / rep.tg_tokens)
                print(f"depth {depth:,} round {round_ + 1}/{args.rounds}: " + ", ".join(
                    f"{side} pp {got[side]['pp'][-1]:,.1f} tg {got[side]['tg'][-1]:,.2f}" for side in engines),
                      file=sys.stderr)
    finally:
        for engine in engines.values():
            engine.close()
        for proc, _ in workers:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
    results = []
    for depth in depths:
        row: dict[str, Any] = {"depth": depth}
        for metric in ("pp", "tg", "pp_cpu_ms", "tg_cpu_ms"):
            local_s, split_s = (summary(samples[depth][side][metric]) for side in ("local", "split"))
            ratio = split_s["median"] / local_s["median"] if local_s["median"] else float("nan")  # /proc ticks: 10 ms
            row[metric] = {"local": local_s, "split": split_s, "ratio": ratio,
                           "samples": {side: samples[depth][side][metric] for side in ("local", "split")}}
        results.append(row)
    cfg = local.config
    return {
        "model": path.name, "file_type": local.spec.file_type, "machine": machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": {"n_ctx": cfg.n_ctx, "n_batch": cfg.n_batch, "n_ubatch": cfg.n_ubatch, "threads": args.threads,
                     "flash_attn": cfg.flash_attn, "type_k": cfg.type_k, "type_v": cfg.type_v},
        "split": {"placement": placement, "devices": list(split.config.devices or ()),
                  "tensor_split": list(split.config.tensor_split or ()), "n_gpu_layers": split.config.n_gpu_layers},
        "pp": args.pp, "tg": args.tg, "rounds": args.rounds, "command": " ".join(sys.argv), "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:,.1f} ({s['min']:,.1f}–{s['max']:,.1f})"

    pp, tg = report["pp"], report["tg"]
    lines = [f"| model | depth | pp{pp} local t/s | pp{pp} split t/s | pp ratio | tg{tg} local t/s | tg{tg} split t/s "
             "| tg ratio | CPU ms/token pp: local → split | CPU ms/token tg: local → split |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in report["results"]:
        p, t, pc, tc = row["pp"], row["tg"], row["pp_cpu_ms"], row["tg_cpu_ms"]
        lines.append(f"| {report['model']} ({report['file_type']}) | {row['depth']:,} | {cell(p['local'])} | "
                     f"{cell(p['split'])} | {p['ratio']:.3f} | {cell(t['local'])} | {cell(t['split'])} | "
                     f"{t['ratio']:.3f} | {pc['local']['median']:.2f} → {pc['split']['median']:.2f} "
                     f"(×{pc['ratio']:.2f}) | {tc['local']['median']:.2f} → {tc['split']['median']:.2f} "
                     f"(×{tc['ratio']:.2f}) |")
    s = report["settings"]
    placed = ", ".join(f"{p['host']} {p['layers']}{' + output' if p['output_layer'] else ''}"
                       for p in report["split"]["placement"])
    lines += ["", f"split: {placed} (tensor split {report['split']['tensor_split']}); n_ctx {s['n_ctx']:,}, KV "
                  f"{s['type_k']}, flash attention {'on' if s['flash_attn'] else 'off'}, {s['threads']} thread(s) per "
                  f"process, batch {s['n_batch']}/{s['n_ubatch']}; medians of {report['rounds']} interleaved rounds "
                  f"(min–max); load average {report['load_average']['before'][0]:.2f} → "
                  f"{report['load_average']['after'][0]:.2f}"]
    return "\n".join(lines)


def main() -> None:
    from lcrun.param_types import parse_ctx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file or `demo`")
    parser.add_argument("--depth", type=parse_ctx, action="append", default=[], help="KV cache depth (repeatable)")
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="threads of each process (this one and each worker)")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="off")
    parser.add_argument("--json", type=Path, help="write the report (every sample) here")
    args = parser.parse_args()
    report = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
