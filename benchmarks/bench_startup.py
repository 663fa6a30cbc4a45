"""Start-up of lcrun's commands on GGUFs with real vocabularies, against llama-cpp-python opening the same file.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5] [--json bench-work/startup.json] [--previous DIR]

Builds (once, into bench-work/startup/) two GGUFs of real vocabulary shape with tiny weights
(tests/fixtures/realistic_gguf.py): Llama 3's 128,256 tokens with 280,147 merges, and Gemma 3's 262,144 SPM tokens.
Then, interleaved round by round, each a fresh process (start-up and imports included on both sides):

- the reference: `python -c "from llama_cpp import Llama; Llama(model_path=F, vocab_only=True, verbose=False)"`
- `lcrun inspect F`, `lcrun estimate F --json`, `lcrun plan F`, `lcrun chat F --dry-run`
- chat to its first prompt: `lcrun chat F --no-history` with `/quit` on stdin (planning, loading the model and the
  KV cache, the plan panel, then the prompt read), against `Llama(model_path=F)` loading the same file fully.

- serve to its first answer: `lcrun serve F --port P` started until `GET /health` answers 200 (planning, loading the
  model and its slots' KV cache, the app), against `Llama(model_path=F)` loading the same file fully.
- `lcrun --help` against `python -c pass` (the interpreter's own start).
- with `--previous DIR` (another lcrun checkout with its own .venv, e.g. the previous main): its `chat --dry-run` and
  chat to its first prompt and its serve to /health, in the same rounds, so a change is compared with what it
  replaces on the same load.

Targets (issue 9): each command ≤ 1.5× the vocab_only reference and ≤ 1 s; chat to its prompt ≤ the full load + 1 s;
(issue 12) `lcrun --help` ≤ 0.3 s beyond the interpreter's start.
Medians of --repeat runs; every run is in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.realistic_gguf import write_realistic_gguf  # noqa: E402  (the path is set just above)

LCRUN = [sys.executable, "-m", "lcrun.cli"]
VOCAB_ONLY = "from llama_cpp import Llama; Llama(model_path={path!r}, vocab_only=True, verbose=False)"
FULL_LOAD = "from llama_cpp import Llama; Llama(model_path={path!r}, verbose=False)"


PREVIOUS_OF = {"previous: lcrun chat --dry-run": "lcrun chat --dry-run",
               "previous: chat to its prompt": "lcrun chat to its prompt",
               "previous: serve to /health": "lcrun serve to /health"}
SERVE = "--serve--"   # in place of stdin: start the command as a server and time it until /health answers


def previous_commands(path: Path, previous: Path) -> dict[str, tuple[list[str], str | None]]:
    lcrun = [str(previous / ".venv" / "bin" / "python"), "-m", "lcrun.cli"]
    return {
        "previous: lcrun chat --dry-run": ([*lcrun, "chat", str(path), "--dry-run"], None),
        "previous: chat to its prompt": ([*lcrun, "chat", str(path), "--no-history"], "/quit\n"),
        "previous: serve to /health": ([*lcrun, "serve", str(path), "-t", "1"], SERVE),
    }


def commands(path: Path) -> dict[str, tuple[list[str], str | None]]:
    return {
        "reference: Llama(vocab_only=True)": ([sys.executable, "-c", VOCAB_ONLY.format(path=str(path))], None),
        "lcrun inspect": ([*LCRUN, "inspect", str(path)], None),
        "lcrun estimate --json": ([*LCRUN, "estimate", str(path), "--json"], None),
        "lcrun plan": ([*LCRUN, "plan", str(path)], None),
        "lcrun chat --dry-run": ([*LCRUN, "chat", str(path), "--dry-run"], None),
        "reference: python -c pass": ([sys.executable, "-c", "pass"], None),
        "lcrun --help": ([*LCRUN, "--help"], None),
        "reference: Llama() full load": ([sys.executable, "-c", FULL_LOAD.format(path=str(path))], None),
        "lcrun chat to its prompt": ([*LCRUN, "chat", str(path), "--no-history"], "/quit\n"),
        "lcrun serve to /health": ([*LCRUN, "serve", str(path), "-t", "1"], SERVE),
    }


def timed(argv: list[str], stdin: str | None, env: dict[str, str]) -> float:
    # each checkout runs from its own folder, so `python -m lcrun.cli` imports that checkout's lcrun
    cwd = Path(argv[0]).parent.parent.parent if argv[0].endswith("/.venv/bin/python") else ROOT
    if stdin == SERVE:
        return timed_server(argv, env, cwd)
    started = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])}… failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return elapsed


def timed_server(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from the start of `argv` (a server) to its first 200 on /health, on a free port; then stopped."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    server = subprocess.Popen([*argv, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env, cwd=cwd, text=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"{' '.join(argv[:5])}… ended ({server.returncode}): {server.stderr.read()[-400:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.01)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work" / "startup")
    parser.add_argument("--family", action="append", choices=["llama3", "gemma"],
                        help="Only this vocabulary (repeatable; default both).")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--previous", type=Path, metavar="DIR",
                        help="Another lcrun checkout (with .venv) whose chat start-up is timed in the same rounds.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = {}
    for family, label in (("llama3", "128,256 tokens + 280,147 merges"), ("gemma", "262,144 tokens (SPM)")):
        if args.family and family not in args.family:
            continue
        path = args.work / f"{family}.gguf"
        if not path.exists():
            write_realistic_gguf(path.with_suffix(".partial"), family)
            os.replace(path.with_suffix(".partial"), path)
        files[family] = (path, label)
    # as users run it: compiled .pyc files are written and reused (a PYTHONDONTWRITEBYTECODE in the caller's
    # environment would recompile lcrun's own modules on every start)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update({"NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "LCRUN_DEBUG": ""})
    results: dict[str, dict[str, list[float]]] = {}
    for family, (path, _) in files.items():
        cmds = commands(path)
        if args.previous:
            cmds.update(previous_commands(path, args.previous.resolve()))
        runs: dict[str, list[float]] = {name: [] for name in cmds}
        for name, (argv, stdin) in cmds.items():  # one untimed warm-up each: page cache, .pyc files
            timed(argv, stdin, env)
        for _ in range(args.repeat):
            for name, (argv, stdin) in cmds.items():
                runs[name].append(timed(argv, stdin, env))
        results[family] = runs

    print(f"{'file':<8} {'command':<34} {'median s':>9} {'ratio':>7}   target")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for family, runs in results.items():
        vocab_only = statistics.median(runs["reference: Llama(vocab_only=True)"])
        full = statistics.median(runs["reference: Llama() full load"])
        bare = statistics.median(runs["reference: python -c pass"])
        summary[family] = {}
        for name, times in runs.items():
            median = statistics.median(times)
            if name in PREVIOUS_OF:
                mine = statistics.median(runs[PREVIOUS_OF[name]])
                ratio, target = f"{mine / median:.2f}×", f"{PREVIOUS_OF[name]} ÷ previous: ≤ 1 wanted"
            elif name.startswith("reference"):
                ratio, target = "", ""
            elif name == "lcrun --help":
                ratio = f"+{median - bare:.2f}s"
                target = "≤ 0.3 s of its own: " + ("met" if median - bare <= 0.3 else "NOT met")
            elif name in ("lcrun chat to its prompt", "lcrun serve to /health"):
                ratio = f"+{median - full:.2f}s"
                target = "≤ full load + 1 s: " + ("met" if median <= full + 1 else "NOT met")
            else:
                ratio = f"{median / vocab_only:.2f}×"
                met = median <= 1.5 * vocab_only and median <= 1.0
                target = "≤ 1.5× and ≤ 1 s: " + ("met" if met else "NOT met")
            summary[family][name] = {"median_s": median, "min_s": min(times), "max_s": max(times)}
            print(f"{family:<8} {name:<34} {median:>9.3f} {ratio:>7}   {target}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "files": {f: {"path": str(p), "vocabulary": label} for f, (p, label) in files.items()},
            "summary": summary, "runs": results,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        }, indent=2))


if __name__ == "__main__":
    main()
