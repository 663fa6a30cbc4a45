"""The disk prompt cache (`--cache-dir`): the KV state of a long prompt, saved once it is evaluated, and restored when a
later request — also after a restart — starts with the same tokens.

One file per saved prompt, named by the hash of its tokens and the model's fingerprint (the model file, the KV
types, flash attention and RoPE overrides: what the KV numbers depend on) — and, with several API keys, the key's
id: the hashes of one key's prompts never match another key's, so a file is restored only for the key that wrote it.
A file holds its tokens' prefix hashes, one per 256-token block (each hash covers all tokens before it), the tokens,
and the sequence state llama.cpp gave (`Engine.snapshot`). A request looks up the file sharing the most leading
blocks with its prompt; restoring it and dropping whatever differs leaves the exact common prefix; the tokens read
back are checked against their hashes before llama.cpp sees the state. The directory is bounded in bytes, counting
every cache file in it (other models', other servers'): least recently used files go first (a file's modification
time is its last use).

The files hold prompts' token ids: the directory is made 0700 and the files 0600. A file is written as
`<name>.<PID-START>.partial` and renamed into place (lcrun.atomic_files); a `.partial` is removed only once the process
that wrote it is gone (lcrun.process_files), so servers sharing a directory do not delete each other's writes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcrun.atomic_files import write_atomic
from lcrun.engine.protocol import SequenceState
from lcrun.errors import LcrunError
from lcrun.process_files import remove_stale

MAGIC = b"LCRUNKV1"
BLOCK = 256
SUFFIX = ".lcrunkv"
_PARTIAL = r"[0-9a-f]{16}-[0-9a-f]{32}\.lcrunkv\.(\d+-\d+)\.partial"
_OLD_PARTIAL = r"[0-9a-f]{16}-[0-9a-f]{32}\.lcrunkv\.partial"     # lcrun before writers were named
_FILE = re.compile(r"[0-9a-f]{16}-[0-9a-f]{32}\.lcrunkv")


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
        self._directory_bytes = 0
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PromptCacheError(str(directory), f"cannot create the cache directory ({exc.strerror})") from None
        if not os.access(directory, os.W_OK):
            raise PromptCacheError(str(directory), "the cache directory is not writable")
        remove_stale(directory, _PARTIAL, untagged=_OLD_PARTIAL)
        for path in directory.glob(f"*{SUFFIX}"):
            try:
                entry = self._read_header(path)
            except PromptCacheError:
                continue  # another model's or a damaged file: never matched (and evicted like any other)
            if entry is not None:
                self._entries[path] = entry
        self._evict()

    def _seed(self, partition: str | None) -> str:
        """What the prefix hashes are chained from: the model's fingerprint, and whose prompts these are."""
        return self.fingerprint if partition is None else f"{self.fingerprint}:{partition}"

    # -- lookups (scheduler thread) ----------------------------------------------------------------------------
    def lookup(self, tokens: list[int], partition: str | None = None) -> tuple[Entry, int] | None:
        """The entry of `partition` (an API key's id, or None) sharing the most leading blocks with `tokens`, and
        how many tokens those blocks hold."""
        if len(tokens) < self.min_tokens:
            return None
        wanted = prefix_hashes(tokens, self._seed(partition))
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

    def covers(self, tokens: list[int], partition: str | None = None) -> bool:
        """Whether some file holds every full block of `tokens` already (saving them again would add nothing)."""
        hit = self.lookup(tokens, partition)
        return hit is not None and hit[1] == len(tokens) // BLOCK * BLOCK

    def total_bytes(self) -> int:
        """Bytes in the directory's cache files (every model's), as of the last write or eviction."""
        return self._directory_bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- files (the cache's worker thread) -------------------------------------------------------------------------
    def load(self, entry: Entry, partition: str | None = None) -> SequenceState:
        try:
            with open(entry.path, "rb") as f:
                header = self._header(f, entry.path)
                tokens = np.frombuffer(f.read(4 * header["n_tokens"]), dtype="<i4")
                data = f.read()
        except OSError as exc:
            self._forget(entry.path)
            raise PromptCacheError(str(entry.path), f"cannot read ({exc.strerror})") from None
        if len(tokens) != header["n_tokens"] or len(data) != header["data_bytes"]:
            self._remove(entry.path)
            raise PromptCacheError(str(entry.path), "truncated")
        # the tokens must be the ones the lookup matched: a file changed on disk is not handed to llama.cpp
        hashes = prefix_hashes(tokens.tolist(), self._seed(partition))
        if hashes != header["hashes"] or hashes != entry.hashes:
            self._remove(entry.path)
            raise PromptCacheError(str(entry.path), "its tokens do not match their hashes (changed on disk)")
        self._touch(entry)
        return SequenceState(tuple(tokens.tolist()), data)

    def store(self, state: SequenceState, partition: str | None = None) -> Path | None:
        """Write a prompt's state (atomically), drop the files it supersedes and the least recently used beyond the
        size bound. None when it is too large for the bound by itself."""
        seed = self._seed(partition)
        hashes = prefix_hashes(state.tokens, seed)
        header = json.dumps({"fingerprint": self.fingerprint, "n_tokens": len(state.tokens), "block": BLOCK,
                             "hashes": hashes, "data_bytes": len(state.data)}).encode()
        token_bytes = np.asarray(state.tokens, dtype="<i4").tobytes()
        size = len(MAGIC) + 4 + len(header) + len(token_bytes) + len(state.data)
        if size > self.max_bytes:
            return None
        digest = hashlib.blake2b(seed.encode() + token_bytes, digest_size=16).hexdigest()
        path = self.directory / f"{self.fingerprint[:16]}-{digest}{SUFFIX}"
        self._evict(reserve=size)  # room first: a full disk is not made fuller
        # 0600 from the start, and never through a link someone left in the directory
        write_atomic(path, [MAGIC + struct.pack("<I", len(header)) + header, token_bytes, state.data], private=True,
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

    def _evict(self, reserve: int = 0) -> None:
        """Remove the least recently used cache files, of any model, until the directory's cache files and the
        writes in progress (`.partial`, anyone's) leave `reserve` bytes under the bound."""
        files: list[tuple[float, int, Path]] = []
        total = 0
        try:
            scan = list(os.scandir(self.directory))
        except OSError:
            return
        for item in scan:
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            if _FILE.fullmatch(item.name):
                files.append((st.st_mtime, st.st_size, Path(item.path)))
                total += st.st_size
            elif item.name.endswith(".partial") and SUFFIX in item.name:
                total += st.st_size
        files.sort()
        for _, size, path in files:
            if total + reserve <= self.max_bytes:
                break
            self._remove(path)
            total -= size
        self._directory_bytes = total


def model_fingerprint(model_path: Path, *, type_k: str, type_v: str, flash_attn: bool,
                      rope_freq_base: float | None, rope_freq_scale: float | None,
                      engine_version: str | None = None) -> str:
    """What a saved KV state depends on: the model file (its identity on disk, lcrun.model_identity: one stat, not
    9 MiB read per start, and sound across copies), the KV cache types and layout, RoPE overrides and the llama.cpp
    that wrote the state (the installed llama-cpp-python's version, unless given)."""
    from lcrun.model_identity import file_identity

    if engine_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            engine_version = version("llama_cpp_python")
        except PackageNotFoundError:
            engine_version = "unknown"
    return hashlib.sha256(json.dumps([file_identity(model_path) or str(model_path), type_k, type_v, flash_attn,
                                      rope_freq_base, rope_freq_scale, engine_version]).encode()).hexdigest()
