"""Time lcrun's converter against llama.cpp's convert_hf_to_gguf.py on the same checkpoint, interleaved.

    .venv/bin/python benchmarks/bench_convert.py CKPT [--repeat N] [--outtypes bf16,q8_0] [--json OUT]
    .venv/bin/python benchmarks/bench_convert.py bench-work/ckpt-ct-nvfp4 --outtypes auto   # a 4-bit checkpoint

For each outtype, runs peer, lcrun, peer, lcrun, ... (N of each, at least 3) so that drift in the machine (page cache,
thermal, neighbours) lands on both tools alike; the table gives each tool's median and range and lcrun/peer of the
medians, and names the machine (CPU model, cores, memory) and its load average before and after. Each run is one child process: wall time from spawn to exit; peak memory
as the high-water RSS (VmHWM) of the child's process tree, summed over the tree every 50 ms. VmHWM is monotonic per
process, so a peak between two samples is still seen. After each run, dirty pages are written back (os.sync, untimed)
so that one run's output is not being flushed to disk during the next.
The first run of each tool per outtype is fingerprinted in a separate process with gguf.GGUFReader (tensor names,
types, shapes, a hash of each tensor's bytes, metadata keys); the peer's and lcrun's fingerprints are then compared.
The first outputs of the two tools are also decoded tensor by tensor (gguf.quants, an NVFP4 weight times its
`.scale`) and compared as values: the two files may store one weight in different types (int4 as BF16 by the peer,
Q4_0 by lcrun) and still hold the same numbers, or not. Every output is deleted once measured and compared. Run it with the project venv's python (it needs gguf and psutil).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PEER_PYTHON = REPO / "bench-work" / "peer-venv" / "bin" / "python"
RUN_PEER = REPO / "benchmarks" / "run_peer.py"
LCRUN = REPO / ".venv" / "bin" / "lcrun"
SAMPLE_S = 0.05


@dataclass
class Run:
    tool: str
    outtype: str
    round: int
    wall_s: float
    peak_rss_mib: float
    ru_maxrss_mib: float
    returncode: int
    output_bytes: int
    log: str


@dataclass
class Fingerprint:
    tensors: dict[str, tuple[str, tuple[int, ...], str]] = field(default_factory=dict)  # name -> type, shape, digest
    kv_keys: set[str] = field(default_factory=set)


def command(tool: str, ckpt: Path, outtype: str, out: Path) -> list[str]:
    if tool == "peer":
        return [str(PEER_PYTHON), str(RUN_PEER), str(ckpt), "--outtype", outtype, "--outfile", str(out)]
    return [str(LCRUN), "convert", str(ckpt), "-o", str(out), "--outtype", outtype, "--quiet", "--force"]


def high_water_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0  # a zombie has no memory left to report


def tree_high_water(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += high_water_rss(p.pid)
        except (OSError, psutil.Error):
            pass
    return total


def measure(argv: list[str], log_path: Path) -> tuple[float, float, float, int]:
    """Wall seconds, peak RSS MiB (sampled VmHWM), ru_maxrss MiB and exit code of one child and what it starts.

    ru_maxrss is kept only as a cross-check: Linux carries the parent's high-water mark into a child that
    subprocess starts with vfork + exec, so it is never below this benchmark's own RSS."""
    peak = 0
    done = threading.Event()
    with log_path.open("wb") as log:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        proc = psutil.Process(child.pid)

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                try:
                    peak = max(peak, tree_high_water(proc))
                except psutil.Error:
                    return
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)  # blocking here keeps the wall time exact, not 50 ms-grained
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped above; stops Popen from waiting again
    return wall, peak / 2**20, usage.ru_maxrss / 1024, child.returncode  # ru_maxrss is KiB on Linux


def fingerprint_json(path: Path) -> str:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        digest = hashlib.blake2b(t.data.tobytes(), digest_size=16).hexdigest()
        tensors[t.name] = [t.tensor_type.name, [int(d) for d in t.shape], digest]
    keys = sorted(f.name for f in reader.fields.values() if not f.name.startswith("GGUF."))
    return json.dumps({"tensors": tensors, "kv_keys": keys})


def decoded_diff_json(peer: Path, ours: Path) -> str:
    """Per weight in both files: its types and max |peer − lcrun| / max |peer| of the decoded values."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    def tensors(path: Path) -> dict:
        return {t.name: t for t in GGUFReader(path).tensors}

    def values(ts: dict, name: str):
        t = ts[name]
        v = dequantize(t.data, t.tensor_type).astype("float64").reshape(-1)
        scale = ts.get(name.removesuffix(".weight") + ".scale")
        return v * float(scale.data[0]) if scale is not None else v

    tp, to = tensors(peer), tensors(ours)
    rows = {}
    for name in sorted(set(tp) & set(to)):
        if not name.endswith(".weight"):
            continue
        a, b = values(tp, name), values(to, name)
        top = float(abs(a).max()) or 1.0
        rows[name] = [tp[name].tensor_type.name, to[name].tensor_type.name, float(abs(a - b).max()) / top]
    return json.dumps(rows)


def decoded_notes(outtype: str, peer: Path, ours: Path) -> list[str]:
    raw = subprocess.run([sys.executable, __file__, "--decoded-diff", str(peer), str(ours)], check=True,
                         capture_output=True, text=True).stdout
    groups: dict[tuple[str, str], list[float]] = {}
    for p_type, o_type, diff in json.loads(raw).values():
        groups.setdefault((p_type, o_type), []).append(diff)
    notes = []
    for (p_type, o_type), diffs in sorted(groups.items()):
        same = sum(d == 0 for d in diffs)
        notes.append(f"{outtype}: decoded values, peer {p_type} vs lcrun {o_type}: {same}/{len(diffs)} tensors "
                     f"identical, largest difference {max(diffs):.2g} of the tensor's max |value|")
    return notes


def fingerprint(path: Path) -> Fingerprint:
    """In a child process, so that mapping the output never grows this process (see measure)."""
    raw = subprocess.run([sys.executable, __file__, "--fingerprint", str(path)], check=True,
                         capture_output=True, text=True).stdout
    data = json.loads(raw)
    return Fingerprint(tensors={n: (v[0], tuple(v[1]), v[2]) for n, v in data["tensors"].items()},
                       kv_keys=set(data["kv_keys"]))


def type_counts(fp: Fingerprint) -> dict[str, int]:
    return dict(sorted(Counter(v[0] for v in fp.tensors.values()).items()))


def compare(outtype: str, peer: Fingerprint, ours: Fingerprint) -> list[str]:
    notes = []
    p_names, o_names = set(peer.tensors), set(ours.tensors)
    notes.append(f"{outtype}: peer {len(p_names)} tensors, lcrun {len(o_names)} tensors")
    if p_names - o_names:
        notes.append(f"{outtype}: only in peer: {', '.join(sorted(p_names - o_names))}")
    if o_names - p_names:
        notes.append(f"{outtype}: only in lcrun: {', '.join(sorted(o_names - p_names))}")
    common = sorted(p_names & o_names)
    type_diff = [n for n in common if peer.tensors[n][0] != ours.tensors[n][0]]
    shape_diff = [n for n in common if peer.tensors[n][1] != ours.tensors[n][1]]
    byte_diff = [n for n in common if n not in type_diff and n not in shape_diff
                 and peer.tensors[n][2] != ours.tensors[n][2]]
    for n in type_diff:
        notes.append(f"{outtype}: {n} type peer {peer.tensors[n][0]} vs lcrun {ours.tensors[n][0]}")
    for n in shape_diff:
        notes.append(f"{outtype}: {n} shape peer {peer.tensors[n][1]} vs lcrun {ours.tensors[n][1]}")
    notes.append(f"{outtype}: types peer {type_counts(peer)}, lcrun {type_counts(ours)}")
    same = len(common) - len(type_diff) - len(shape_diff) - len(byte_diff)
    notes.append(f"{outtype}: {same}/{len(common)} common tensors byte-identical"
                 + (f"; differ: {', '.join(byte_diff[:8])}{' …' if len(byte_diff) > 8 else ''}" if byte_diff else ""))
    if peer.kv_keys - ours.kv_keys:
        notes.append(f"{outtype}: metadata only in peer: {', '.join(sorted(peer.kv_keys - ours.kv_keys))}")
    if ours.kv_keys - peer.kv_keys:
        notes.append(f"{outtype}: metadata only in lcrun: {', '.join(sorted(ours.kv_keys - peer.kv_keys))}")
    return notes


def warm_read(ckpt: Path) -> int:
    """Read every file once so that both tools start from a warm page cache."""
    total = 0
    for f in sorted(ckpt.iterdir()):
        if f.is_file():
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


def table(runs: list[Run], outtypes: list[str]) -> tuple[str, list[dict]]:
    rows, summary = [], []
    for outtype in outtypes:
        med = {}
        for tool in ("peer", "lcrun"):
            ok = [r for r in runs if r.tool == tool and r.outtype == outtype and r.returncode == 0]
            med[tool] = (statistics.median(r.wall_s for r in ok), statistics.median(r.peak_rss_mib for r in ok)) if ok else None
            if ok:
                walls = [r.wall_s for r in ok]
                summary.append({"tool": tool, "outtype": outtype, "runs": len(ok), "wall_s_median": med[tool][0],
                                "wall_s_min": min(walls), "wall_s_max": max(walls),
                                "peak_rss_mib_median": med[tool][1]})
        for tool in ("peer", "lcrun"):
            if med[tool] is None:
                rows.append(f"| {tool} | {outtype} | failed | | failed | |")
                continue
            wall, rss = med[tool]
            walls = [r.wall_s for r in runs if r.tool == tool and r.outtype == outtype and r.returncode == 0]
            ratio = ""
            if tool == "lcrun" and med["peer"]:
                ratio = f"{wall / med['peer'][0]:.2f}x time, {rss / med['peer'][1]:.2f}x RSS"
                summary[-1]["wall_ratio"] = wall / med["peer"][0]
                summary[-1]["rss_ratio"] = rss / med["peer"][1]
            rows.append(f"| {tool} | {outtype} | {wall:.2f} | {min(walls):.2f}-{max(walls):.2f} | {rss:.0f} | {ratio} |")
    head = ("| tool | outtype | wall s (median) | wall s (range) | peak RSS MiB (median) | lcrun/peer (medians) |\n"
            "|---|---|---|---|---|---|\n")
    return head + "\n".join(rows), summary


def machine() -> dict:
    """What the figures were measured on: they are only comparable within one run on one machine."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, nargs="?")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each tool per outtype (at least 3)")
    parser.add_argument("--outtypes", default="bf16,q8_0")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "runs",
                        help="where outputs and logs go (outputs are deleted after each run)")
    parser.add_argument("--fingerprint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--decoded-diff", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fingerprint:
        print(fingerprint_json(args.fingerprint))
        return
    if args.decoded_diff:
        print(decoded_diff_json(*args.decoded_diff))
        return
    if args.ckpt is None:
        parser.error("CKPT is required")
    if args.repeat < 3:
        parser.error("--repeat must be at least 3: a median of fewer rounds on a shared machine is one noisy sample")
    outtypes = args.outtypes.split(",")
    ckpt = args.ckpt.resolve()
    for needed, hint in ((PEER_PYTHON, "run benchmarks/setup_peer.sh"), (LCRUN, "install the project venv")):
        if not needed.exists():
            sys.exit(f"bench_convert: {needed} is missing; {hint}")
    args.workdir.mkdir(parents=True, exist_ok=True)

    warmed = warm_read(ckpt)
    os.sync()
    host = machine()
    load_before = os.getloadavg()
    print(f"checkpoint {ckpt} ({warmed / 2**20:.0f} MiB read warm); {args.repeat} rounds of peer, lcrun per outtype",
          file=sys.stderr)
    runs: list[Run] = []
    notes: list[str] = []
    for outtype in outtypes:
        prints: dict[str, Fingerprint] = {}
        kept: dict[str, Path] = {}
        for rnd in range(args.repeat):
            for tool in ("peer", "lcrun"):
                out = args.workdir / f"{tool}-{outtype}.gguf"
                log = args.workdir / f"{tool}-{outtype}-{rnd}.log"
                out.unlink(missing_ok=True)
                wall, rss, ru_maxrss, rc = measure(command(tool, ckpt, outtype, out), log)
                os.sync()
                size = out.stat().st_size if out.exists() else 0
                runs.append(Run(tool, outtype, rnd, wall, rss, ru_maxrss, rc, size, str(log)))
                status = "ok" if rc == 0 and size else f"FAILED rc={rc}, see {log}"
                print(f"  {tool:5} {outtype:5} round {rnd}: {wall:6.2f} s, {rss:6.0f} MiB, "
                      f"{size / 2**20:.0f} MiB out, {status}", file=sys.stderr)
                if rc != 0 or not size:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    notes.append(f"{tool} {outtype} round {rnd} failed (rc={rc}): {' | '.join(tail)}")
                elif tool not in prints:
                    prints[tool] = fingerprint(out)
                    kept[tool] = out.rename(out.with_name(f"first-{out.name}"))  # for decoded_notes
                out.unlink(missing_ok=True)
            if len(kept) == 2:
                notes += decoded_notes(outtype, kept["peer"], kept["lcrun"])
            if len(kept) == 2 or rnd == args.repeat - 1:
                for path in kept.values():
                    path.unlink(missing_ok=True)
                kept = {}
        if len(prints) == 2:
            notes += compare(outtype, prints["peer"], prints["lcrun"])

    load_after = os.getloadavg()
    md, summary = table(runs, outtypes)
    print(f"{host['cpu_model']}, {host['cpus']} CPUs, {host['memory_gib']} GiB; load average (1/5/15 min) "
          f"{'/'.join(f'{x:.2f}' for x in load_before)} before, {'/'.join(f'{x:.2f}' for x in load_after)} after\n")
    print(md)
    if notes:
        print("\nNotes:")
        print("\n".join(f"- {n}" for n in notes))
    if args.json:
        peer_version = (REPO / "bench-work" / "llama_cpp_python-0.3.36.tar.gz").exists() and "llama-cpp-python 0.3.36"
        args.json.write_text(json.dumps({
            "checkpoint": str(ckpt),
            "checkpoint_mib": warmed / 2**20,
            "repeat": args.repeat,
            "peer": peer_version or "unknown",
            "machine": {**host, "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}},
            "load_average": {"before": load_before, "after": load_after},
            "summary": summary,
            "runs": [asdict(r) for r in runs],
            "notes": notes,
            "markdown": md,
        }, indent=2))


if __name__ == "__main__":
    main()
