"""The disk prompt cache (`--cache-dir`): the KV state of a long prompt, saved once it is evaluated, and restored when a
later request — also after a restart — starts with the same tokens.

One file per saved prompt, named by the hash of its tokens and the model's fingerprint (the model file, the KV types,
flash attention and RoPE overrides: what the KV numbers depend on). A file holds its tokens' prefix hashes, one per
256-token block (each hash covers all tokens before it), the tokens, and the sequence state llama.cpp gave
(`Engine.snapshot`). A request looks up the file sharing the most leading blocks with its prompt; restoring it and
dropping whatever differs leaves the exact common prefix. The directory is bounded in bytes: least recently used
files go first (a file's modification time is its last use)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcrun.atomic_files import write_atomic
from lcrun.engine.protocol import SequenceState
from lcrun.errors import LcrunError

MAGIC = b"LCRUNKV1"
BLOCK = 256
SUFFIX = ".lcrunkv"


class PromptCacheError(LcrunError):
    """A cache file that cannot be read, or a directory that cannot be written."""


def prefix_hashes(tokens: list[int] | tuple[int, ...], fingerprint: str, block: int = BLOCK) -> list[str]:
    """The hash of tokens[:block·(i+1)] for each full block i, each chained on the one before."""
    data = np.asarray(tokens, dtype="<i4").tobytes()
    out, previous = [], fingerprint.encode()
    step = block * 4
    for end in range(step, len(data) + 1, step):
        previous = hashlib.blake2b(previous + data[end - step:end], digest_size=16).digest()
        out.append(previous.hex())
    return out


@dataclass
class Entry:
    path: Path
    n_tokens: int
    hashes: list[str]
    size: int
    used: float


class PromptCache:
    def __init__(self, directory: Path, fingerprint: str, *, max_bytes: int, min_tokens: int = 1024) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.min_tokens = max(min_tokens, BLOCK)
        self._lock = threading.Lock()
        self._entries: dict[Path, Entry] = {}
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PromptCacheError(str(directory), f"cannot create the cache directory ({exc.strerror})") from None
        if not os.access(directory, os.W_OK):
            raise PromptCacheError(str(directory), "the cache directory is not writable")
        for path in directory.glob(f"*{SUFFIX}"):
            try:
                entry = self._read_header(path)
            except PromptCacheError:
                continue  # another model's or a damaged file: left alone, and never matched
            if entry is not None:
                self._entries[path] = entry
        for stale in directory.glob(f"*{SUFFIX}.partial"):
            stale.unlink(missing_ok=True)

    # -- lookups (scheduler thread) ----------------------------------------------------------------------------
    def lookup(self, tokens: list[int]) -> tuple[Entry, int] | None:
        """The entry sharing the most leading blocks with `tokens`, and how many tokens those blocks hold."""
        if len(tokens) < self.min_tokens:
            return None
        wanted = prefix_hashes(tokens, self.fingerprint)
        best: tuple[Entry, int] | None = None
        with self._lock:
            for entry in self._entries.values():
                shared = 0
                for mine, theirs in zip(wanted, entry.hashes):
                    if mine != theirs:
                        break
                    shared += 1
                if shared and (best is None or (shared * BLOCK, entry.used) > (best[1], best[0].used)):
                    best = (entry, shared * BLOCK)
        return best

    def covers(self, tokens: list[int]) -> bool:
        """Whether some file holds every full block of `tokens` already (saving them again would add nothing)."""
        hit = self.lookup(tokens)
        return hit is not None and hit[1] == len(tokens) // BLOCK * BLOCK

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- files (the cache's worker thread) -------------------------------------------------------------------------
    def load(self, entry: Entry) -> SequenceState:
        try:
            with open(entry.path, "rb") as f:
                header = self._header(f, entry.path)
                tokens = np.frombuffer(f.read(4 * header["n_tokens"]), dtype="<i4")
                data = f.read()
        except OSError as exc:
            self._forget(entry.path)
            raise PromptCacheError(str(entry.path), f"cannot read ({exc.strerror})") from None
        if len(tokens) != header["n_tokens"] or len(data) != header["data_bytes"]:
            self._forget(entry.path)
            raise PromptCacheError(str(entry.path), "truncated")
        self._touch(entry)
        return SequenceState(tuple(tokens.tolist()), data)

    def store(self, state: SequenceState) -> Path | None:
        """Write a prompt's state (atomically), drop the files it supersedes and the least recently used beyond the
        size bound. None when it is too large for the bound by itself."""
        hashes = prefix_hashes(state.tokens, self.fingerprint)
        header = json.dumps({"fingerprint": self.fingerprint, "n_tokens": len(state.tokens), "block": BLOCK,
                             "hashes": hashes, "data_bytes": len(state.data)}).encode()
        token_bytes = np.asarray(state.tokens, dtype="<i4").tobytes()
        size = len(MAGIC) + 4 + len(header) + len(token_bytes) + len(state.data)
        if size > self.max_bytes:
            return None
        digest = hashlib.blake2b(self.fingerprint.encode() + token_bytes, digest_size=16).hexdigest()
        path = self.directory / f"{self.fingerprint[:16]}-{digest}{SUFFIX}"
        write_atomic(path, [MAGIC + struct.pack("<I", len(header)) + header, token_bytes, state.data],
                     error=PromptCacheError)
        entry = Entry(path, len(state.tokens), hashes, size, os.stat(path).st_mtime)
        with self._lock:
            superseded = [e.path for e in self._entries.values()
                          if e.path != path and e.hashes == hashes[: len(e.hashes)] and e.n_tokens <= entry.n_tokens]
            self._entries[path] = entry
        for old in superseded:
            self._remove(old)
        self._evict()
        return path

    # -- internals ------------------------------------------------------------------------------------------------
    def _header(self, f, path: Path) -> dict:  # type: ignore[no-untyped-def]
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise PromptCacheError(str(path), "not an lcrun prompt cache file")
        (length,) = struct.unpack("<I", head[len(MAGIC):])
        try:
            header = json.loads(f.read(length))
            if not isinstance(header, dict) or not isinstance(header.get("hashes"), list):
                raise ValueError
            int(header["n_tokens"]), int(header["data_bytes"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise PromptCacheError(str(path), "damaged header") from None
        return header

    def _read_header(self, path: Path) -> Entry | None:
        try:
            with open(path, "rb") as f:
                header = self._header(f, path)
            st = path.stat()
        except OSError as exc:
            raise PromptCacheError(str(path), f"cannot read ({exc.strerror})") from None
        if header.get("fingerprint") != self.fingerprint or header.get("block") != BLOCK:
            return None
        return Entry(path, int(header["n_tokens"]), [str(h) for h in header["hashes"]], st.st_size, st.st_mtime)

    def _touch(self, entry: Entry) -> None:
        try:
            os.utime(entry.path)
            entry.used = os.stat(entry.path).st_mtime
        except OSError:
            pass

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def _remove(self, path: Path) -> None:
        self._forget(path)
        path.unlink(missing_ok=True)

    def _evict(self) -> None:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.used)
            total = sum(e.size for e in entries)
            doomed = []
            while entries and total > self.max_bytes:
                victim = entries.pop(0)
                total -= victim.size
                doomed.append(victim.path)
        for path in doomed:
            self._remove(path)


def model_fingerprint(model_path: Path, *, type_k: str, type_v: str, flash_attn: bool,
                      rope_freq_base: float | None, rope_freq_scale: float | None, engine_version: str) -> str:
    """What a saved KV state depends on: the model's bytes (its size, the header and a sample of the tensor data at
    both ends, so another quant or fine-tune of the same model differs), the KV cache types and layout, RoPE overrides
    and the llama.cpp release that wrote the state."""
    h = hashlib.sha256()
    size = model_path.stat().st_size
    with open(model_path, "rb") as f:
        h.update(f.read(8 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read())
    h.update(json.dumps([size, type_k, type_v, flash_attn, rope_freq_base, rope_freq_scale, engine_version]).encode())
    return h.hexdigest()
