"""Beyond one machine: real `lcrun worker` processes on 127.0.0.1 (free ports, started and stopped here) and a real
llama.cpp engine split across this process and both workers over ggml's RPC backend.

A split run answers token for token as a local one; llama.cpp's own per-device figures (its log in a real run, its
memory breakdown in the dry run) equal the plan's weights and KV to the byte; a worker killed mid-generation is one
line naming it and the transcript keeps every finished turn; an unreachable, busy or other-version worker, a bind
beyond loopback and a build without RPC are one-line errors or warnings."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lcrun.convert.convert import convert_checkpoint
from lcrun.engine import rpc
from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.cli import invoke

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
GIB = 1 << 30


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice (a worker binds its port only once it has started)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class Worker:
    """`lcrun worker` in a child process, one CPU thread (the machine's cores are shared with the client)."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.args = args
        self.prefix = prefix  # e.g. `ip netns exec NS`: the worker runs in another network namespace
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "lcrun.cli", "worker", "--port",
                                      str(self.port), "--threads", "1", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if "--host" not in self.args else self.args[self.args.index("--host") + 1]
        return f"{host}:{self.port}"

    def wait_listening(self, timeout: float = 60.0) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("listening on" in line for line in self.stdout):
                return self
            if self.proc.poll() is not None:
                time.sleep(0.1)  # the reader threads catch up
                if "the port is in use" in "".join(self.stderr):  # taken by another process meanwhile: again
                    self._start()
                    continue
                break
            time.sleep(0.05)
        raise AssertionError(f"worker did not start: {''.join(self.stdout + self.stderr)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six layers with llama3 RoPE (so rope_freqs.weight, which every device holding layers gets a copy of)."""
    root = tmp_path_factory.mktemp("rpc-model")
    ck = make_llama_checkpoint(root / "ckpt", hidden=128, layers=6, heads=4, kv_heads=2, ffn=256, rope=LLAMA3_ROPE)
    return convert_checkpoint(ck.path, root / "split.gguf", outtype="f16").paths[0]


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    pair = [Worker(), Worker()]
    try:
        yield [w.wait_listening() for w in pair]
    finally:
        for w in pair:
            w.stop()


def child(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# The engine as chat, niah and bench load it (lcrun.launch.decide_launch), greedy, in a child process: the abort
# handler a split run installs, and ggml's RPC connections, stay out of the test process.
GREEDY_RUN = r"""
import json, sys
from pathlib import Path
from lcrun.engine.protocol import GREEDY
from lcrun.engine.runtime import Engine
from lcrun.generation.drive import generate
from lcrun.generation.records import GenerationParams, Request
from lcrun.launch.decide import decide_launch
from lcrun.launch.options import LaunchOptions
rpc = tuple(sys.argv[2].split(",")) if sys.argv[2] else ()
launch = decide_launch(LaunchOptions(sys.argv[1], ctx=512, flash_attn="off", threads=1, ram=16 << 30, rpc=rpc))
engine = Engine(launch.config)
prompt = engine.tokenize("The quick brown fox jumps over the lazy dog, again and again.", add_bos=True)
finished = list(generate(engine, Request(prompt, GenerationParams(GREEDY, max_tokens=48, ignore_eos=True))))[-1]
plan = launch.choice.estimate
print(json.dumps({"tokens": list(finished.tokens), "devices": [d.__dict__ for d in plan.devices],
                  "offload": plan.offload, "tensor_split": plan.tensor_split, "n_gpu_layers": plan.n_gpu_layers,
                  "config_devices": launch.config.devices}))
engine.close()
"""

_BUFFER_LINE = re.compile(r"(load_tensors|llama_kv_cache):\s+(\S+) (model|KV) buffer size =\s+([\d.]+) MiB")


def logged_buffers(log: str) -> dict[tuple[str, str], float]:
    """llama.cpp's log of a real load: MiB per (buffer type, "model" | "KV")."""
    found: dict[tuple[str, str], float] = {}
    for _, name, kind, mib in _BUFFER_LINE.findall(log):
        found[(name, kind)] = found.get((name, kind), 0.0) + float(mib)
    return found


def test_split_run_answers_as_a_local_run_and_llama_cpp_allocates_the_plan(model: Path, workers: list[Worker]) -> None:
    local = child(GREEDY_RUN, str(model), "")
    assert local.returncode == 0, local.stderr
    split = child(GREEDY_RUN, str(model), ",".join(w.endpoint for w in workers), env={"LCRUN_DEBUG": "1"})
    assert split.returncode == 0, split.stderr[-3000:]
    ours, theirs = json.loads(local.stdout.splitlines()[-1]), json.loads(split.stdout.splitlines()[-1])

    # the split is real: this process's CPU and both workers hold layers, the output layer the last worker
    assert ours["n_gpu_layers"] == 0 and ours["config_devices"] is None
    by_host = {d["host"]: d for d in theirs["devices"]}
    assert set(by_host) == {"", *(w.endpoint for w in workers)}
    assert all(d["layers"] >= 1 for d in by_host.values())
    assert by_host[workers[1].endpoint]["output_layer"] and not by_host[""]["output_layer"]
    assert theirs["offload"] == [rpc.device_name(w.endpoint, 0) for w in workers] == theirs["config_devices"]
    assert sum(theirs["tensor_split"]) == theirs["n_gpu_layers"] == 7 - by_host[""]["layers"]

    assert len(ours["tokens"]) == 48 and theirs["tokens"] == ours["tokens"]

    # llama.cpp's own log of that real load: each worker's weights and KV are the plan's (0.01 MiB resolution)
    logged = logged_buffers(split.stderr)
    for worker in workers:
        device = by_host[worker.endpoint]
        name = rpc.device_name(worker.endpoint, 0)
        assert logged[(name, "KV")] == pytest.approx(device["kv_bytes"] / (1 << 20), abs=0.006)
        assert logged[(name, "model")] == pytest.approx(device["weights_bytes"] / (1 << 20), abs=0.006)
    assert logged[("CPU", "KV")] == pytest.approx(by_host[""]["kv_bytes"] / (1 << 20), abs=0.006)
    assert any(line.endswith("client connected\n") for line in workers[0].stdout)


def test_serve_over_workers_answers_as_serve_alone(model: Path, workers: list[Worker]) -> None:
    from tests.fixtures.serve_support import ServeProcess, metrics

    def served(*extra: str) -> tuple[list[str], str]:
        with ServeProcess(str(model), "-c", "512", "-fa", "off", "-t", "1", "--ram", "16G", *extra) as server:
            client = server.client()
            answers = [client.completions.create(model="split.gguf", prompt=prompt, temperature=0, max_tokens=24)
                       .choices[0].text for prompt in ("The quick brown fox", "Rivers run to the sea because")]
            assert metrics(server.url)["lcrun_generated_tokens_total"] == 48
            banner = "".join(server.stdout_lines)
            code, _, err = server.stop()
        assert code == 0, err
        return answers, banner

    alone, _ = served()
    assert len(set(alone)) == 2 and all(alone)   # two different, non-empty answers to compare
    split, banner = served("--rpc", ",".join(w.endpoint for w in workers))
    assert split == alone
    assert all(w.endpoint in banner for w in workers)   # the plan panel shows the layers on both workers


def test_llama_cpps_dry_run_allocates_the_plans_bytes_on_each_device(model: Path, workers: list[Worker]) -> None:
    result = invoke("plan", str(model), "--ctx", "1k", "-fa", "on", "--ram", "16G", "--verify", "--json",
                    "--rpc", ",".join(w.endpoint for w in workers))
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    measured = plan["llama_cpp"]["devices"]
    held = [d for d in plan["devices"] if d["bytes"]]
    assert [d["name"] for d in held] == ["CPU", *(rpc.device_name(w.endpoint, 0) for w in workers)]
    assert all(d["layers"] for d in held)
    for device in held:
        assert measured[device["name"]]["weights_bytes"] == device["weights_bytes"], device["name"]
        assert measured[device["name"]]["kv_bytes"] == device["kv_bytes"], device["name"]
    assert plan["llama_cpp"]["kv_bytes"] == plan["kv_bytes"] and plan["llama_cpp"]["weights_bytes"] == \
        plan["weights_bytes"]
    # negative control: the comparison is per device, and the devices hold different amounts
    assert len({d["weights_bytes"] for d in held}) == len(held)

    shown = invoke("plan", str(model), "--ctx", "1k", "-fa", "on", "--ram", "16G", "--verify",
                   "--rpc", ",".join(w.endpoint for w in workers))
    assert shown.exit_code == 0, shown.stderr
    assert "per device" in shown.stdout and workers[1].endpoint in shown.stdout
    assert shown.stdout.count(" =") >= 6  # weights and KV marked equal on each of the three devices


def test_a_worker_killed_mid_generation_is_one_line_and_the_transcript_keeps_finished_turns(
        model: Path, tmp_path: Path) -> None:
    questions = ["Tell me a long story about foxes.\n", "And now another one, about dogs.\n"]

    def chat(history: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lcrun.cli", "chat", str(model), "--temp", "0", "-n", "400",
                                 "-c", "1k", "-fa", "off", "-t", "1", "--history", str(history), *extra],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # control: the same conversation on this machine alone has a long second reply, so the kill lands mid-reply
    control = chat(tmp_path / "control.jsonl")
    out, err = control.communicate("".join(questions).encode(), timeout=180)
    assert control.returncode == 0, err.decode()
    turns = [json.loads(line) for line in (tmp_path / "control.jsonl").read_text().splitlines()]
    assert len(turns) == 2 and turns[1]["completion_tokens"] >= 200

    pair = [Worker(), Worker()]
    try:
        for w in pair:
            w.wait_listening()
        history = tmp_path / "history.jsonl"
        proc = chat(history, "--rpc", ",".join(w.endpoint for w in pair))
        seen: list[bytes] = []
        threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read1(4096), b"")), daemon=True).start()
        proc.stdin.write(questions[0].encode())
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while not (history.exists() and history.read_text().count("\n") == 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.02)
        before = len(b"".join(seen))
        proc.stdin.write(questions[1].encode())
        proc.stdin.flush()
        while len(b"".join(seen)) <= before + 8:  # the second reply is streaming
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.005)
        pair[1].proc.kill()
        proc.wait(60)
        stderr = proc.stderr.read().decode()
    finally:
        for w in pair:
            w.stop()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 1
    assert lines[-1].startswith(f"error: worker {pair[1].endpoint} went away")
    assert "transcript" in lines[-1] and "Traceback" not in stderr and "ggml-rpc.cpp" not in stderr
    kept = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["user"] == questions[0].strip()
    assert kept[0]["assistant"] == turns[0]["assistant"]  # the split run had answered as the local one
    assert len(b"".join(seen)) < len(out)  # it stopped mid-reply: less than the control conversation wrote


# The engine generating until killed, over the workers given, in a child process; "off" leaves ggml's connections
# as ggml makes them (no keepalive): the control of the test below.
LOOP_RUN = r"""
import sys
from pathlib import Path
from lcrun.engine import rpc
from lcrun.engine.protocol import GREEDY
from lcrun.engine.runtime import Engine
from lcrun.generation.drive import generate
from lcrun.generation.records import GenerationParams, Request
from lcrun.launch.decide import decide_launch
from lcrun.launch.options import LaunchOptions
if sys.argv[3] == "off":
    rpc.keep_alive = lambda endpoints: 0
launch = decide_launch(LaunchOptions(sys.argv[1], ctx=512, flash_attn="off", threads=1, ram=16 << 30,
                                     rpc=(sys.argv[2],)))
engine = Engine(launch.config)
prompt = engine.tokenize("The quick brown fox", add_bos=True)
print("generating", flush=True)
while True:
    list(generate(engine, Request(prompt, GenerationParams(GREEDY, max_tokens=400, ignore_eos=True))))
"""


class Netns:
    """A network namespace joined to this one by a veth pair: a second machine on a cable that can be cut."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.name, self.here, self.there = f"lcrun-test-{tag}", f"lcv{tag}a", f"lcv{tag}b"
        net = f"10.251.{tag % 250}"
        self.address = f"{net}.2"
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.here, "type", "veth", "peer", "name", self.there)
        self._ip("link", "set", self.there, "netns", self.name)
        self._ip("addr", "add", f"{net}.1/24", "dev", self.here)
        self._ip("link", "set", self.here, "up")
        self._ip("-n", self.name, "addr", "add", f"{self.address}/24", "dev", self.there)
        self._ip("-n", self.name, "link", "set", self.there, "up")
        self._ip("-n", self.name, "link", "set", "lo", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def cut(self) -> None:
        """The other machine goes away without a word: its end of the cable goes down, packets are lost."""
        self._ip("-n", self.name, "link", "set", self.there, "down")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


def _network_namespaces() -> str | None:
    """Why this machine cannot make network namespaces, or None when it can."""
    if shutil.which("ip") is None:
        return "no `ip` command (Debian's iproute2)"
    probe = subprocess.run(["ip", "netns", "add", f"lcrun-probe-{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` refused: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"lcrun-probe-{os.getpid()}"], capture_output=True)
    return None


@pytest.mark.slow
def test_a_worker_whose_machine_vanishes_ends_the_run_in_one_line(model: Path) -> None:
    """A worker that vanishes without closing its connection (cable cut, power off) used to hang the run inside ggml,
    which sets no timeout. With keepalive on ggml's connections the run ends in about half a minute with one line;
    the control, the same run with ggml's connections left as ggml makes them, is still waiting then."""
    why_not = _network_namespaces()
    if why_not:
        pytest.skip(f"needs network namespaces to cut a worker off: {why_not}")
    net = Netns()
    workers: list[Worker] = []
    runs: dict[str, subprocess.Popen] = {}
    try:
        workers = [Worker("--host", net.address, prefix=("ip", "netns", "exec", net.name)).wait_listening()
                   for _ in range(2)]
        for mode, worker in zip(("keepalive", "off"), workers):
            runs[mode] = subprocess.Popen([sys.executable, "-c", LOOP_RUN, str(model), worker.endpoint, mode],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for run in runs.values():
            assert run.stdout is not None and run.stdout.readline() == "generating\n", run.stderr
        time.sleep(1)
        net.cut()
        cut_at = time.monotonic()
        _, err = runs["keepalive"].communicate(timeout=120)
        ended_after = time.monotonic() - cut_at
        assert runs["keepalive"].returncode == 1
        assert err.strip().splitlines() == [err.strip()] and err.startswith(
            f"error: worker {workers[0].endpoint} went away"), err
        assert runs["off"].poll() is None, "the control ended too: the check above proves nothing"
        assert ended_after < 90
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
            run.wait()
        for worker in workers:
            worker.proc.kill()
            worker.proc.wait()
        net.close()


def test_an_unreachable_worker_is_named_in_one_line(model: Path) -> None:
    port = free_port()
    for args in (["chat", str(model), "-p", "hi", "--no-history"], ["estimate", str(model)], ["plan", str(model)],
                 ["bench", str(model)]):
        result = invoke(*args, "--rpc", f"127.0.0.1:{port}")
        assert result.exit_code == 1, (args, result.stdout)
        assert result.stderr == (f"error: 127.0.0.1:{port}: connection refused: no `lcrun worker` listens there "
                                 f"(start one with `lcrun worker --port {port}` on that machine)\n"), args


def test_a_worker_of_another_protocol_version_is_refused_in_one_line(model: Path) -> None:
    """A stand-in for an rpc-server of protocol 6.1.0: it answers ggml's HELLO as such a server would."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1 + 8 + 24)
            conn.sendall(struct.pack("<Q", 28) + bytes([6, 1, 0, 0]) + bytes(24))
            conn.recv(1)

    threading.Thread(target=answer, daemon=True).start()
    try:
        result = invoke("estimate", str(model), "--rpc", f"127.0.0.1:{port}")
    finally:
        server.close()
    assert result.exit_code == 1
    assert result.stderr == (f"error: 127.0.0.1:{port}: speaks RPC protocol 6.1.0, this lcrun 7.0.0: run the same "
                             "llama-cpp-python (0.3.36) on both machines\n")


def test_something_else_on_the_port_is_not_taken_for_a_worker() -> None:
    """A server that is not ggml's (it hangs up on the HELLO, as an rpc-server of another major version does)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(64)
        conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        result = invoke("plan", "llama-3.1-8b", "--rpc", f"127.0.0.1:{port}")
    finally:
        server.close()
    assert result.exit_code == 1
    assert result.stderr == (f"error: 127.0.0.1:{port}: closed the connection during the handshake: not a ggml RPC "
                             "server of protocol 7.0.0 (run the same llama-cpp-python, 0.3.36, on both machines)\n")


def test_a_worker_serving_another_client_is_busy_not_hung(workers: list[Worker]) -> None:
    endpoint = workers[0].endpoint
    assert rpc.probe(endpoint) == rpc.PROTOCOL
    holder = socket.create_connection(("127.0.0.1", workers[0].port))  # a client the worker is now serving
    try:
        holder.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))
        holder.recv(36)
        started = time.monotonic()
        with pytest.raises(rpc.WorkerError, match="serving another client"):
            rpc.probe(endpoint, timeout=1.0)
        assert time.monotonic() - started < 5
    finally:
        holder.close()
    deadline = time.monotonic() + 10
    while True:  # free again once that client left
        try:
            assert rpc.probe(endpoint, timeout=1.0) == rpc.PROTOCOL
            break
        except rpc.WorkerError:
            assert time.monotonic() < deadline


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))  # no packet is sent: only the route's source address is chosen
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_worker_listens_on_loopback_unless_host_says_otherwise_and_then_warns() -> None:
    default = Worker().wait_listening()
    try:
        out = "".join(default.stdout)
        assert f"listening on 127.0.0.1:{default.port} (this machine only)" in out
        assert "offers CPU" in out and "GiB free" in out
        assert "warning" not in "".join(default.stderr)
        other = _non_loopback_address()
        if other is not None:  # a non-loopback address of this machine does not reach it
            with pytest.raises(OSError):
                socket.create_connection((other, default.port), timeout=2).close()
    finally:
        default.stop()

    wide = Worker("--host", "0.0.0.0").wait_listening()
    try:
        warning = "".join(wide.stderr)
        assert warning.startswith(f"warning: listening on 0.0.0.0:{wide.port}, reachable from other machines")
        assert "no authentication" in warning and warning.count("\n") == 1
        other = _non_loopback_address()
        if other is not None:  # negative control for the check above: with --host it is reachable
            assert rpc.probe(f"{other}:{wide.port}") == rpc.PROTOCOL
    finally:
        wide.stop()
    assert "worker stopped" in "".join(wide.stdout)


def test_worker_errors_are_one_line(workers: list[Worker]) -> None:
    taken = invoke("worker", "--port", str(workers[0].port))
    assert taken.exit_code == 1
    assert taken.stderr == (f"error: 127.0.0.1:{workers[0].port}: the port is in use (another worker?); pick "
                            "another with --port\n")
    unknown = invoke("worker", "--port", str(free_port()), "--device", "CUDA7")
    assert unknown.exit_code == 1 and unknown.stderr.startswith("error: --device CUDA7: no such device here")
    bad = invoke("estimate", "llama-3.1-8b", "--rpc", "a:99999")
    assert bad.exit_code == 2 and "the port must be a number from 1 to 65535" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_a_build_without_rpc_says_how_to_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_supports_rpc", lambda: False)
    for args in (["worker"], ["estimate", "llama-3.1-8b", "--rpc", "127.0.0.1:1"]):
        result = invoke(*args)
        assert result.exit_code == 1, args
        assert result.stderr == (f"error: {'lcrun worker' if args == ['worker'] else '--rpc'}: this "
                                 "llama-cpp-python was built without ggml's RPC backend; rebuild it with RPC on: "
                                 f"{rpc.REBUILD_COMMAND}\n")
    # planning for workers that are not running needs no RPC at all
    assert invoke("estimate", "llama-3.1-8b", "--rpc-mem", "a=8G", "--ctx", "8k").exit_code == 0


def test_rpc_mem_plans_for_workers_that_do_not_run_yet() -> None:
    result = invoke("estimate", "meta-llama/Llama-3.1-405B-Instruct", "--quant", "Q4_K_M", "--ctx", "128k",
                    "--kv-type", "q8_0", "--ram", "64G", "--rpc-mem", "a=80G", "--rpc-mem", "b=80G",
                    "--rpc-mem", "c=80G", "--json")
    assert result.exit_code == 0, result.stderr
    (plan,) = json.loads(result.stdout)["plans"]
    assert plan["fits"] and plan["ctx"] == 131072
    hosts = {d["host"]: d for d in plan["devices"]}
    assert set(hosts) == {"", "a:50052", "b:50052", "c:50052"}
    assert sum(d["layers"] for d in hosts.values()) == 126 and hosts["c:50052"]["output_layer"]
    assert all(d["bytes"] <= d["free_bytes"] for d in hosts.values())
    shown = invoke("estimate", "meta-llama/Llama-3.1-405B-Instruct", "--quant", "Q4_K_M", "--ctx", "128k",
                   "--kv-type", "q8_0", "--ram", "64G", "--rpc-mem", "a=80G", "--rpc-mem", "b=80G",
                   "--rpc-mem", "c=80G")
    assert "spread of Q4_K_M, KV q8_0 at 131,072 tokens: fits" in shown.stdout
    assert re.search(r"a:50052: \d+ layer\(s\) · weights", shown.stdout)

    refused = invoke("plan", "meta-llama/Llama-3.1-405B-Instruct", "--quant", "Q4_K_M", "--ctx", "128k",
                     "--ram", "64G", "--rpc-mem", "a=80G")
    assert refused.exit_code == 1
    line = refused.stderr
    assert line.count("\n") == 1 and "131,072 tokens do not fit" in line
    assert re.search(r"\(\d+ GiB more memory is needed over the 2 hosts: e\.g\. another worker, planned with "
                     r"--rpc-mem HOST=\d+G\)", line)


def test_a_run_needs_running_workers(model: Path) -> None:
    result = invoke("chat", str(model), "-p", "hi", "--rpc-mem", "a=8G", "--no-history")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: a:50052: --rpc-mem gives the memory of a worker this run uses")


# -- the worker's side of its connections (issue 20, finding 11) ------------------------------------------------------
def _served_within(endpoint: str, seconds: float) -> float | None:
    """Seconds until a handshake succeeds, or None if none did within `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            rpc.probe(endpoint, timeout=1.0)
            return time.monotonic() - started
        except rpc.WorkerError:
            time.sleep(0.1)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("idle_timeout", ["2", "0"], ids=["idle-timeout", "negative-control-never"])
def test_a_silent_or_idle_client_no_longer_blocks_the_worker(idle_timeout: str) -> None:
    worker = Worker("--idle-timeout", idle_timeout).wait_listening()
    try:
        silent = socket.create_connection(("127.0.0.1", worker.port))   # connects, then says nothing
        time.sleep(0.3)
        if idle_timeout == "0":
            assert _served_within(worker.endpoint, 4.0) is None       # ggml waits on it for ever
            silent.close()
            assert _served_within(worker.endpoint, 10.0) is not None
            return
        waited = _served_within(worker.endpoint, 10.0)
        assert waited is not None and waited < 6, waited
        silent.settimeout(5)
        assert silent.recv(1) == b""                                   # the worker closed it
        silent.close()
        idle = socket.create_connection(("127.0.0.1", worker.port))    # says hello, then nothing more
        idle.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))
        idle.recv(36)
        with pytest.raises(rpc.WorkerError, match="serving another client"):
            rpc.probe(worker.endpoint, timeout=1.0)                     # busy while it is in use
        waited = _served_within(worker.endpoint, 10.0)
        assert waited is not None and waited < 6, waited
        idle.close()
        assert any("dropped client" in line and "after connecting" in line for line in worker.stdout)
        assert any("dropped client" in line and "idle for 2 s" in line for line in worker.stdout)
    finally:
        worker.stop()


@pytest.mark.slow
def test_the_worker_cache_directory_is_bounded(tmp_path: Path) -> None:
    cache = tmp_path / "rpc-cache"
    cache.mkdir()
    now = time.time()
    for age, name in enumerate(["newest", "middle", "oldest"]):   # what ggml writes: a file per large tensor
        path = cache / f"{name:0>16}"
        path.write_bytes(b"\0" * 600_000)
        os.utime(path, (now - 100 * age, now - 100 * age))
    worker = Worker("--cache-dir", str(cache), "--cache-size", "1M").wait_listening()
    try:
        deadline = time.monotonic() + 15
        while sum(p.stat().st_size for p in cache.iterdir()) > 1 << 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(p.name.lstrip("0") for p in cache.iterdir()) == ["newest"]
    finally:
        worker.stop()


def test_a_worker_killed_mid_request_answers_every_request_and_stops_the_server(model: Path) -> None:
    """serve over a worker that is killed while two replies stream and a third request waits: each gets its answer
    (an error event, a 503 `worker_lost`), nothing hangs, and the server exits 1 with one line naming the worker."""
    import openai

    from tests.fixtures.serve_support import ServeProcess, metrics, wait_for

    worker = Worker().wait_listening()
    try:
        server = ServeProcess(str(model), "-c", "2048", "-np", "2", "-fa", "off", "-t", "1", "--ram", "16G",
                              "--rpc", worker.endpoint)
        with server:
            client = server.client(timeout=60)
            endless = dict(model="split.gguf", max_tokens=900, temperature=0, extra_body={"ignore_eos": True})
            streams = [iter(client.completions.create(prompt=p, stream=True, **endless))
                       for p in ("The quick brown fox", "Rivers run to the sea")]
            for stream in streams:
                next(stream)
            waited: list[object] = []
            waiting = threading.Thread(target=lambda: waited.append(_outcome(
                lambda: client.completions.create(prompt="A third one waits", **endless))))
            waiting.start()
            assert wait_for(lambda: metrics(server.url)["lcrun_queue_length"] == 1, 30)
            worker.proc.kill()
            for stream in streams:
                with pytest.raises(openai.APIError) as caught:
                    for _ in stream:
                        pass
                assert "lost a worker" in str(caught.value.message)
            waiting.join(60)
            assert len(waited) == 1 and isinstance(waited[0], openai.InternalServerError), waited
            assert waited[0].status_code == 503 and waited[0].code == "worker_lost"   # type: ignore[union-attr]
            code, _, stderr = server.stop(timeout=60)
        assert code == 1
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and lines[0].startswith(f"error: worker {worker.endpoint} went away"), stderr[-2000:]
        assert "Traceback" not in stderr and "ggml-rpc.cpp" not in stderr
    finally:
        worker.stop()


def _outcome(call):  # type: ignore[no-untyped-def]
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the test looks at what came back
        return exc
