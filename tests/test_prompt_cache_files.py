"""The disk prompt cache's files (issue 20, finding 10) on the real filesystem: private permissions, tokens checked
against their hashes before a state is handed on, a fingerprint from the model file's identity (one stat, sound
across copies) and the installed llama-cpp-python, a size bound counting every model's files, `.partial` files named
by their writer and removed only once it is gone — and the faults: a full filesystem (a real tmpfs, mounted in a
mount namespace of a child) and a writer killed mid-write leave only whole files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lcrun.engine.protocol import SequenceState

FP = "a" * 64


def state(n_tokens: int, data_bytes: int, seed: int = 0) -> SequenceState:
    return SequenceState(tuple((seed * 7919 + i) % 128000 for i in range(n_tokens)), bytes([seed % 251]) * data_bytes)


def cache(directory: Path, fingerprint: str = FP, max_bytes: int = 1 << 30) -> object:
    from lcrun.serve.prompt_cache import PromptCache

    return PromptCache(directory, fingerprint, max_bytes=max_bytes, min_tokens=256)


def test_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask would give 0755 and 0644
    try:
        c = cache(tmp_path / "cache")
        path = c.store(state(512, 1000))  # type: ignore[attr-defined]
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tokens_changed_on_disk_are_refused_before_llama_cpp_sees_them(tmp_path: Path) -> None:
    c = cache(tmp_path)
    saved = state(768, 4096)
    path = c.store(saved)  # type: ignore[attr-defined]
    entry, shared = c.lookup(list(saved.tokens))  # type: ignore[attr-defined]
    assert shared == 768 and c.load(entry).tokens == saved.tokens  # type: ignore[attr-defined]  # negative control
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[8:12], "little")
    at = 12 + header_len + 4 * 600   # token 600: same length, another id
    raw[at:at + 4] = (12345).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    from lcrun.serve.prompt_cache import PromptCacheError

    with pytest.raises(PromptCacheError, match="do not match their hashes"):
        c.load(entry)  # type: ignore[attr-defined]
    assert not path.exists() and len(c) == 0  # type: ignore[arg-type]


def fingerprint(path: Path, version: str | None = None) -> str:
    from lcrun.serve.prompt_cache import model_fingerprint

    return model_fingerprint(path, type_k="f16", type_v="f16", flash_attn=True, rope_freq_base=None,
                             rope_freq_scale=None, engine_version=version)


def test_the_fingerprint_reads_no_model_bytes_and_tells_copies_apart(tmp_path: Path) -> None:
    from importlib.metadata import version

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # reading it would block: a fingerprint that reads the model never returns
    done: list[str] = []
    reader = threading.Thread(target=lambda: done.append(fingerprint(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    if not done:
        with open(fifo, "wb"):  # let the reader go
            pass
    assert done, "the fingerprint read the model file"
    fifo.unlink()

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + b"\x01" * 100_000)
    first = fingerprint(model)
    assert fingerprint(model) == first                                      # the same file, untouched
    assert first == fingerprint(model, version("llama_cpp_python"))         # the installed version by default
    assert first != fingerprint(model, "0.0.1")
    copy = tmp_path / "copy.gguf"
    shutil.copy2(model, copy)  # same bytes, same size and mtime: another file all the same
    assert copy.stat().st_mtime_ns == model.stat().st_mtime_ns and fingerprint(copy) != first
    before = model.stat()
    time.sleep(0.01)
    with open(model, "r+b") as f:   # rewritten in place, same size, mtime put back as it was
        f.seek(50_000)
        f.write(b"\x02")
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert model.stat().st_size == before.st_size and fingerprint(model) != first


def test_the_size_bound_counts_every_models_files(tmp_path: Path) -> None:
    other = cache(tmp_path, "b" * 64, max_bytes=10 << 20)
    theirs = other.store(state(512, 600_000, seed=1))  # type: ignore[attr-defined]
    old = time.time() - 100
    os.utime(theirs, (old, old))
    ours = cache(tmp_path, FP, max_bytes=1_000_000)
    mine = ours.store(state(512, 600_000, seed=2))  # type: ignore[attr-defined]
    assert mine.exists() and not theirs.exists()          # the least recently used went, whoever's it was
    total = sum(p.stat().st_size for p in tmp_path.glob("*.lcrunkv"))
    assert total <= 1_000_000 and ours.total_bytes() == total  # type: ignore[attr-defined]


def test_a_partial_is_removed_only_once_its_writer_is_gone(tmp_path: Path) -> None:
    from lcrun.process_files import process_tag

    name = "a" * 16 + "-" + "0" * 32 + ".lcrunkv"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"{name}.{process_tag(sleeper.pid)}.partial"
        live.write_bytes(b"being written")
        dead = tmp_path / f"{name}.{sleeper.pid + 999999}-1.partial"
        dead.write_bytes(b"left by a killed writer")
        cache(tmp_path)
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    cache(tmp_path)
    assert not live.exists()


# -- faults -------------------------------------------------------------------------------------------------------------
_FULL_DISK = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from lcrun.engine.protocol import SequenceState
    from lcrun.serve.prompt_cache import PromptCache, PromptCacheError
    directory = Path({directory!r})
    how = "tmpfs"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)]).returncode != 0:
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (700_000, 700_000))
        how = "rlimit"
    cache = PromptCache(directory / "cache", "a" * 64, max_bytes=64 << 20, min_tokens=256)
    results = []
    for seed, size in enumerate([600_000, 600_000, 900_000, 300_000]):
        tokens = tuple((seed * 7919 + i) % 128000 for i in range(512))
        try:
            cache.store(SequenceState(tokens, bytes([seed]) * size))
            results.append("stored")
        except PromptCacheError as exc:
            results.append(str(exc))
    again = PromptCache(directory / "cache", "a" * 64, max_bytes=64 << 20, min_tokens=256)
    whole = []
    for entry in list(again._entries.values()):
        whole.append(len(again.load(entry).data))
    print(json.dumps({{"how": how, "results": results, "files": sorted(os.listdir(directory / "cache")),
                      "whole": sorted(whole)}}))
""")


def test_a_full_filesystem_fails_the_write_and_leaves_only_whole_files(tmp_path: Path) -> None:
    script = _FULL_DISK.format(root=str(Path(__file__).resolve().parent.parent), directory=str(tmp_path))
    command = [sys.executable, "-c", script]
    if shutil.which("unshare"):
        command = ["unshare", "--mount", "--map-root-user", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if run.returncode != 0 and "unshare" in run.stderr:  # no namespaces here: the rlimit in the child instead
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    stored = out["results"]
    assert stored[:2] == ["stored", "stored"], out
    failure = "No space left on device" if out["how"] == "tmpfs" else "File too large"
    assert failure in stored[2] and "cannot be written" in stored[2], out   # the one atomic write's wording
    assert not any(name.endswith(".partial") for name in out["files"]), out
    assert len(out["files"]) == len(out["whole"]) == stored.count("stored")   # every file left loads whole
    assert sorted(out["whole"]) == sorted(s for s, r in zip([600_000, 600_000, 900_000, 300_000], stored)
                                          if r == "stored")


_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from lcrun.engine.protocol import SequenceState
    from lcrun.serve.prompt_cache import PromptCache
    cache = PromptCache(Path({directory!r}), "a" * 64, max_bytes=1 << 30, min_tokens=256)
    print("ready", flush=True)
    seed = 0
    while True:
        seed += 1
        cache.store(SequenceState(tuple((seed * 7919 + i) % 128000 for i in range(512)), bytes([seed % 251]) * (48 << 20)))
""")


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_only_whole_files(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(Path(__file__).resolve().parent.parent),
                                                                    directory=str(directory))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        partial = None
        deadline = time.monotonic() + 60
        while partial is None and time.monotonic() < deadline:
            found = [p for p in directory.iterdir() if p.name.endswith(".partial")]
            if found:
                writer.send_signal(signal.SIGSTOP)   # caught mid-write
                partial = next((p for p in found if p.exists()), None)
                if partial is None:
                    writer.send_signal(signal.SIGCONT)
            else:
                time.sleep(0.0005)
        assert partial is not None, "never saw a write in progress"
        cache(directory)   # another server starting beside a live writer leaves its write alone
        assert partial.exists()
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    restarted = cache(directory)
    names = sorted(p.name for p in directory.iterdir())
    assert not any(n.endswith(".partial") for n in names), names
    for entry in list(restarted._entries.values()):  # type: ignore[attr-defined]
        assert len(restarted.load(entry).data) == 48 << 20  # type: ignore[attr-defined]
    assert len(names) == len(restarted)  # type: ignore[arg-type]
