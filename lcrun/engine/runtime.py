"""The llama.cpp engine: one model and one context holding `n_seq` sequences, driven through llama.cpp's C API
(llama_cpp's low-level ctypes bindings of llama.h), streaming typed records.

`Engine.generate` reuses the longest common prefix of a sequence's cached tokens and the new prompt, evaluates only
the rest in chunks (reporting progress, honouring cancellation between chunks), then samples token by token. The
step API (`decode` of several sequences' tokens in one `llama_decode`, then `sample` of each) is what continuous
batching is built on. The model and context parameters are the ones llama-cpp-python's `Llama` passes (the parity
test holds the engine to its tokens), except the YaRN factors: -1, so the GGUF's own values are used.

llama_cpp is imported inside `Engine.__init__`, so importing this module stays cheap.
"""
from __future__ import annotations

import codecs
import ctypes
import itertools
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcrun.errors import EngineError

from .protocol import (
    EngineConfig,
    Feed,
    Finished,
    GenerateEvent,
    PrefillProgress,
    PromptPlan,
    Sampling,
    SequenceState,
    TextChunk,
)

__all__ = [
    "CPU_FA_TILE", "LLAMA_CPP_PYTHON_VERSION", "BackendDevice", "Engine", "EngineConfig", "Feed", "Finished",
    "GenerateEvent", "PrefillProgress", "PromptPlan", "Sampling", "SequenceState", "TextChunk", "context_params", "list_devices",
    "model_params",
]

# The release whose structs and defaults the engine mirrors (llama_model_params/llama_context_params layouts through
# its bindings, the sampler chain and parameters of its Llama class). Another version may lay them out differently.
from lcrun import LLAMA_CPP_PYTHON_VERSION  # noqa: E402  (re-exported: the version the engine mirrors)
CPU_FA_TILE = 64  # GGML_FA_TILE_Q in llama.cpp's ggml-cpu (llama-cpp-python 0.3.36)
REPEAT_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the repeat penalty looks this far back

_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5  # enum ggml_log_level
_DECODE_FAILURES = {1: "no free KV cells for the batch", 2: "aborted", -1: "invalid batch"}


# -- process-wide llama.cpp set-up ----------------------------------------------------------------------------------
class _LlamaLog:
    """llama.cpp's log, kept quiet: error lines are remembered for the next EngineError's message, nothing is
    printed (LCRUN_DEBUG=1 prints all of it to stderr)."""

    def __init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=6)
        self._level = 0
        self._callback: Any = None

    def install(self, lc: Any) -> None:
        # set on every load: llama-cpp-python installs its own callback when its modules load (and others may)
        if self._callback is None:
            @lc.llama_log_callback
            def on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
                if level != _GGML_LOG_CONT:
                    self._level = level
                message = text.decode("utf-8", errors="replace") if text else ""
                if self._level == _GGML_LOG_ERROR:
                    self.errors.append(message)
                if os.environ.get("LCRUN_DEBUG") == "1":
                    sys.stderr.write(message)

            self._callback = on_log
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))

    def detail(self, fallback: str) -> str:
        """The error lines logged since the last call, as one line ("func: " prefixes dropped)."""
        lines = [re.sub(r"^(\w+: )+", "", line.strip()) for line in "".join(self.errors).splitlines()]
        self.errors.clear()
        return "; ".join(line for line in lines if line) or fallback


_log = _LlamaLog()


def quiet_llama_log(lc: Any) -> None:
    """Give llama.cpp's log back to lcrun's quiet callback (after a caller captured it for a while)."""
    _log.install(lc)
_started: set[str] = set()  # "backend" once llama_backend_init ran, "version" once the version was checked


def _start_llama(lc: Any) -> None:
    _log.install(lc)
    if "version" not in _started:
        _started.add("version")
        installed = getattr(lc, "__version__", "unknown")
        if installed != LLAMA_CPP_PYTHON_VERSION:
            print(f"warning: lcrun's engine mirrors llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} but {installed} is "
                  "installed; its C structs or defaults may differ", file=sys.stderr, flush=True)
    if "backend" not in _started:
        lc.llama_backend_init()
        _started.add("backend")


def _ggml_type(name: str) -> int:
    from gguf import GGMLQuantizationType  # the enum values are ggml_type's

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        raise EngineError(str(name), "not a ggml type for the KV cache (try f16, q8_0, q4_0)") from None


def _rate(n: int, seconds: float) -> float:
    return n / seconds if n and seconds > 0 else 0.0


# -- ggml backend devices (ggml-backend.h, reached through libllama, which links libggml) ---------------------------
@dataclass(frozen=True)
class BackendDevice:
    name: str              # what EngineConfig.devices takes
    description: str
    kind: str              # "cpu" | "gpu" | "igpu" | "accel" | "meta"
    free_bytes: int
    total_bytes: int


_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def _ggml_backend(lc: Any) -> Any:
    # dlsym on libllama's handle searches the libraries it links: libggml's C API, which llama_cpp does not bind
    lib = lc.llama_cpp._lib
    c = ctypes
    for name, argtypes, restype in (
        ("ggml_backend_dev_count", [], c.c_size_t),
        ("ggml_backend_dev_get", [c.c_size_t], c.c_void_p),
        ("ggml_backend_dev_by_name", [c.c_char_p], c.c_void_p),
        ("ggml_backend_dev_name", [c.c_void_p], c.c_char_p),
        ("ggml_backend_dev_description", [c.c_void_p], c.c_char_p),
        ("ggml_backend_dev_type", [c.c_void_p], c.c_int),
        ("ggml_backend_dev_memory", [c.c_void_p, c.POINTER(c.c_size_t), c.POINTER(c.c_size_t)], None),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def list_devices() -> list[BackendDevice]:
    """The ggml backend devices llama.cpp can use in this process (the CPU included)."""
    import llama_cpp

    _start_llama(llama_cpp)
    g = _ggml_backend(llama_cpp)
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(BackendDevice(g.ggml_backend_dev_name(dev).decode(), g.ggml_backend_dev_description(dev).decode(),
                                 _DEVICE_KINDS.get(g.ggml_backend_dev_type(dev), "other"), free.value, total.value))
    return out


def _device_list(lc: Any, names: tuple[str, ...]) -> ctypes.Array:
    """llama_model_params.devices: the named devices' handles, NULL-terminated."""
    g = _ggml_backend(lc)
    handles = []
    for name in names:
        dev = g.ggml_backend_dev_by_name(name.encode())
        if not dev:
            from .rpc import device_handle  # an RPC worker's device ("RPC0[host:port]"): ggml connects to it now

            dev = device_handle(name)
        if not dev:
            known = ", ".join(d.name for d in list_devices())
            raise EngineError(name, f"no such ggml device (llama.cpp has: {known})")
        handles.append(dev)
    return (ctypes.c_void_p * (len(handles) + 1))(*handles, None)


# -- parameters -------------------------------------------------------------------------------------------------
def amx_build() -> bool:
    """Whether this llama.cpp's CPU backend multiplies with AMX (built for, and running on, a CPU that has it)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def weight_repacking(requested: bool | None = None) -> bool:
    """llama_model_params.use_extra_bufts for EngineConfig.repack: what was asked, else on unless AMX would be used
    (its matmul crashes: ggml-org/llama.cpp#20824)."""
    return requested if requested is not None else not amx_build()


def model_params(config: EngineConfig) -> Any:
    """The llama_model_params the engine loads its model with: what llama-cpp-python's Llama passes, plus the
    device list (kept alive as the struct's `keep` attribute) and the weight repacking of `weight_repacking`."""
    import llama_cpp as lc

    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if config.n_gpu_layers == -1 else config.n_gpu_layers
    params.split_mode = lc.LLAMA_SPLIT_MODE_LAYER
    params.main_gpu = 0
    params.load_mode = lc.LLAMA_LOAD_MODE_MMAP
    params.vocab_only = False
    params.use_extra_bufts = weight_repacking(config.repack)
    params.keep = []
    if config.devices is not None:
        devices = _device_list(lc, config.devices)
        params.keep.append(devices)
        params.devices = ctypes.addressof(devices)
    if config.tensor_split is not None:
        limit = lc.llama_max_devices()
        if len(config.tensor_split) > limit:
            raise EngineError(f"{len(config.tensor_split)} devices", f"llama.cpp splits over at most {limit}")
        split = (ctypes.c_float * limit)(*config.tensor_split)
        params.keep.append(split)
        params.tensor_split = split
    return params


def context_params(config: EngineConfig) -> Any:
    """The llama_context_params the engine creates its context with: what llama-cpp-python's Llama passes (same
    thread and batch defaults) except the YaRN factors, -1 (Llama passes 1/32/1, which would override the GGUF's), and
    n_seq sequences."""
    import llama_cpp as lc

    params = lc.llama_context_default_params()
    n_batch = min(config.n_ctx, config.n_batch)
    params.n_ctx = config.n_ctx
    params.n_batch = n_batch
    params.n_ubatch = min(n_batch, config.n_ubatch)
    params.n_seq_max = config.n_seq
    params.kv_unified = config.kv_unified
    params.n_threads = config.n_threads or max((os.cpu_count() or 2) // 2, 1)
    params.n_threads_batch = config.n_threads_batch or os.cpu_count() or 1
    params.rope_scaling_type = lc.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
    params.pooling_type = lc.LLAMA_POOLING_TYPE_UNSPECIFIED
    params.attention_type = lc.LLAMA_ATTENTION_TYPE_UNSPECIFIED
    params.rope_freq_base = config.rope_freq_base or 0.0
    params.rope_freq_scale = config.rope_freq_scale or 0.0
    params.yarn_ext_factor = -1.0
    params.yarn_attn_factor = -1.0
    params.yarn_beta_fast = -1.0
    params.yarn_beta_slow = -1.0
    params.yarn_orig_ctx = 0
    params.embeddings = False
    params.offload_kqv = True
    params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn
                              else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    params.type_k = _ggml_type(config.type_k)
    params.type_v = _ggml_type(config.type_v)
    params.no_perf = False
    return params


def _sampler_chain(lc: Any, n_vocab: int, sampling: Sampling) -> Any:
    """The chain llama-cpp-python's Llama builds for these settings (penalties, then greedy or
    top-k/typical/top-p/min-p/temperature/dist)."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        lc.llama_sampler_chain_add(chain, sampler)

    add(lc.llama_sampler_init_penalties(n_vocab, REPEAT_LAST_N, sampling.repeat_penalty, sampling.frequency_penalty,
                                        sampling.presence_penalty))
    seed = sampling.seed & 0xFFFFFFFF
    if sampling.temperature < 0:
        add(lc.llama_sampler_init_dist(seed))
    elif sampling.temperature == 0:
        add(lc.llama_sampler_init_greedy())
    else:
        add(lc.llama_sampler_init_top_k(sampling.top_k))
        add(lc.llama_sampler_init_typical(1.0, 1))
        add(lc.llama_sampler_init_top_p(sampling.top_p, 1))
        add(lc.llama_sampler_init_min_p(sampling.min_p, 1))
        add(lc.llama_sampler_init_temp(sampling.temperature))
        add(lc.llama_sampler_init_dist(seed))
    return chain


def _meta_string(fn: Any, model: Any, index: int, buf: list[Any]) -> str:
    n = fn(model, index, buf[0], len(buf[0]))
    if n >= len(buf[0]):  # the return is the full length, like snprintf
        buf[0] = ctypes.create_string_buffer(n + 1)
        n = fn(model, index, buf[0], len(buf[0]))
    return buf[0].raw[: max(n, 0)].decode("utf-8", errors="replace")


def _metadata(lc: Any, model: Any) -> dict[str, str]:
    buf = [ctypes.create_string_buffer(1024)]
    return {
        _meta_string(lc.llama_model_meta_key_by_index, model, i, buf):
            _meta_string(lc.llama_model_meta_val_str_by_index, model, i, buf)
        for i in range(lc.llama_model_meta_count(model))
    }


# -- per-sequence bookkeeping ---------------------------------------------------------------------------------------
class _Batch:
    """One llama_batch over numpy arrays (one sequence id per token), filled in place for each decode."""

    def __init__(self, lc: Any, capacity: int) -> None:
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # seq_id is int32**: one pointer per token, into `seq`
        self._seq_ptrs = (np.arange(capacity, dtype=np.uintp) * self.seq.itemsize + self.seq.ctypes.data)
        c = ctypes
        self.struct = lc.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(c.POINTER(lc.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(c.POINTER(lc.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(c.POINTER(c.c_int32)),
            seq_id=self._seq_ptrs.ctypes.data_as(c.POINTER(c.POINTER(lc.llama_seq_id))),
            logits=self.logits.ctypes.data_as(c.POINTER(c.c_int8)),
        )


class _Sequence:
    """What one sequence holds: its tokens (positions 0..n-1) and, for counting KV cells, runs of cells
    [block, start, stop) — a block is cells one decode series made; sequences sharing a copied prefix share its
    blocks (unified KV)."""

    __slots__ = ("tokens", "n", "runs", "extendable")

    def __init__(self, capacity: int) -> None:
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.n = 0
        self.runs: list[list[int]] = []
        self.extendable = False  # the last run is this sequence's own and ends at n

    def appended(self, count: int, new_block: Any) -> None:
        if self.extendable and self.runs and self.runs[-1][2] == self.n:
            self.runs[-1][2] += count
        else:
            self.runs.append([new_block(), self.n, self.n + count])
            self.extendable = True
        self.n += count

    def cut(self, keep: int) -> None:
        self.runs = [[block, start, min(stop, keep)] for block, start, stop in self.runs if start < keep]
        self.n = keep
        self.extendable = False  # cells past `keep` in the last block may still belong to a copy


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        import llama_cpp

        lc = self._lc = llama_cpp
        self.config = config
        self._model: Any = None
        self._ctx: Any = None
        self._samplers: dict[int, Any] = {}
        _start_llama(lc)
        path = Path(config.model_path)
        if not path.is_file():
            raise EngineError(str(path), "no such model file")
        max_seq = lc.llama_max_parallel_sequences()
        if not 1 <= config.n_seq <= max_seq:
            raise EngineError(f"{config.n_seq} sequences", f"llama.cpp holds 1 to {max_seq} in one context")
        cparams, mparams = context_params(config), model_params(config)
        _log.errors.clear()
        self._model = lc.llama_model_load_from_file(os.fsencode(path), mparams)
        if not self._model:
            raise EngineError(str(path), f"llama.cpp could not load the model ({_log.detail('no reason given')})")
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            detail = _log.detail("no reason given")
            self.close()
            raise EngineError(str(path), f"llama.cpp could not create a {config.n_ctx:,}-token context ({detail})")
        if config.devices:
            from .rpc import endpoint_of, keep_alive

            # a worker whose machine vanishes ends the run (one line) instead of hanging it
            keep_alive([e for e in map(endpoint_of, config.devices) if e is not None])
        self._vocab = lc.llama_model_get_vocab(self._model)
        self._mem = lc.llama_get_memory(self._ctx)
        self.n_ctx: int = lc.llama_n_ctx(self._ctx)
        self.n_ctx_seq: int = lc.llama_n_ctx_seq(self._ctx)
        self.n_seq: int = lc.llama_n_seq_max(self._ctx)
        self.n_batch: int = lc.llama_n_batch(self._ctx)
        self.n_ctx_train: int = lc.llama_model_n_ctx_train(self._model)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self._vocab)
        self.metadata: dict[str, str] = _metadata(lc, self._model)
        self._batch = _Batch(lc, self.n_batch)
        self._seqs = [_Sequence(self.n_ctx_seq) for _ in range(self.n_seq)]
        self._blocks = itertools.count().__next__
        self._outputs: dict[int, int] = {}      # sequence → batch index of its logits in the last decode
        self._pending_copies: set[int] = set()  # sequences whose copied KV data llama.cpp writes at the next decode
        self._pieces: dict[int, bytes] = {}     # token → its bytes: a token's piece never changes

    # -- the model ------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def token_text(self, token: int) -> str:
        return self._lc.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    @property
    def add_bos(self) -> bool:
        """Whether prompts start with BOS (llama.cpp adds it when tokenizing with add_special)."""
        return bool(self._lc.llama_vocab_get_add_bos(self._vocab))

    def special_tokens(self) -> dict[str, int]:
        """bos, eos and eot ids the vocabulary defines (absent ones left out)."""
        lc, vocab = self._lc, self._vocab
        found = {"bos": lc.llama_vocab_bos(vocab), "eos": lc.llama_vocab_eos(vocab), "eot": lc.llama_vocab_eot(vocab)}
        return {name: int(tok) for name, tok in found.items() if tok >= 0}

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        # Chat templates spell out <|begin_of_text|> themselves, hence no BOS by default.
        lc, data = self._lc, text.encode("utf-8")
        size = len(data) + 2
        for _ in range(2):
            buf = np.empty(size, dtype=np.int32)
            n = lc.llama_tokenize(self._vocab, data, len(data), buf.ctypes.data_as(ctypes.POINTER(lc.llama_token)),
                                  size, add_bos, special)
            if n >= 0:
                return buf[:n].tolist()
            size = -n
        raise EngineError("text", f"llama.cpp could not tokenize {len(data):,} bytes")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            # llama-cpp-python's own token_to_piece/detokenize use a fixed 32-byte buffer; long pieces need more
            lc, size = self._lc, 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = lc.llama_token_to_piece(self._vocab, lc.llama_token(int(token)), buf, size, 0, False)
                if n >= 0:
                    piece = self._pieces[token] = buf.raw[:n]
                    break
                size = -n
        return piece

    # -- sequences ----------------------------------------------------------------------------------------------
    def _seq(self, seq: int) -> _Sequence:
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence {seq} does not exist (this engine has {self.n_seq})")
        return self._seqs[seq]

    @property
    def cached_tokens(self) -> list[int]:
        return self.seq_tokens(0)

    def seq_tokens(self, seq: int) -> list[int]:
        s = self._seq(seq)
        return s.tokens[: s.n].tolist()

    def seq_len(self, seq: int) -> int:
        return self._seq(seq).n

    def common_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """How many of `tokens` sequence `seq` holds already, from the start."""
        s = self._seq(seq)
        n = min(s.n, len(tokens))
        differ = np.flatnonzero(s.tokens[:n] != np.asarray(tokens[:n], dtype=np.int32))
        return int(differ[0]) if differ.size else n

    def seq_truncate(self, seq: int, keep: int) -> int:
        """Drop a sequence's tokens from position `keep` on; return how many stay (0 when llama.cpp cannot remove
        part of it)."""
        s = self._seq(seq)
        keep = max(keep, 0)
        if keep < s.n:
            lc = self._lc
            if keep == 0 or not lc.llama_memory_seq_rm(self._mem, seq, keep, -1):
                lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
                keep = 0
            s.cut(keep)
            self._outputs.pop(seq, None)
        return s.n

    def seq_clear(self, seq: int) -> None:
        self.seq_truncate(seq, 0)

    def seq_copy(self, src: int, dst: int, n: int | None = None) -> None:
        """Make sequence `dst` hold the first `n` tokens of `src` (all by default) — their KV cells too, so a
        prompt on `dst` that starts with them evaluates only the rest. With a unified KV cache the cells are shared;
        otherwise llama.cpp copies `src`'s buffer into `dst`'s at the next decode (saving, snapshotting, loading or
        restoring `dst` before then runs a one-token decode to get it done, which drops the last decode's logits)."""
        s, d = self._seq(src), self._seq(dst)
        n = s.n if n is None else n
        if not 0 <= n <= s.n:
            raise ValueError(f"sequence {src} holds {s.n} tokens, cannot copy {n}")
        if src == dst:
            self.seq_truncate(dst, n)
            return
        self.seq_clear(dst)
        if n == 0:
            return
        lc = self._lc
        if self.config.kv_unified:
            lc.llama_memory_seq_cp(self._mem, src, dst, 0, n)
            d.runs = [[block, start, min(stop, n)] for block, start, stop in s.runs if start < n]
            d.n, d.extendable = n, False
        else:
            # between separate buffers llama.cpp copies whole sequences only: copy all, then cut
            lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            if n < s.n:
                lc.llama_memory_seq_rm(self._mem, dst, n, -1)
            self._pending_copies.add(dst)
            d.appended(n, self._blocks)
        d.tokens[:n] = s.tokens[:n]

    def kv_cells_used(self) -> int:
        """KV cells holding some sequence's tokens (a shared prefix counts once)."""
        extent: dict[int, tuple[int, int]] = {}
        for s in self._seqs:
            for block, start, stop in s.runs:
                extent[block] = (start, max(stop, extent.get(block, (start, start))[1]))
        return sum(stop - start for start, stop in extent.values())

    # -- the step API -------------------------------------------------------------------------------------------
    def set_sampler(self, seq: int, sampling: Sampling) -> None:
        """Give sequence `seq` a fresh sampler chain (penalty history empty) for `sampling`."""
        self._seq(seq)
        old = self._samplers.pop(seq, None)
        if old is not None:
            self._lc.llama_sampler_free(old)
        self._samplers[seq] = _sampler_chain(self._lc, self.n_vocab, sampling)

    def decode(self, feeds: Sequence[Feed]) -> None:
        """One llama_decode appending each feed's tokens to its sequence. The logits of the previous decode are
        gone afterwards: sample what you need before the next one."""
        if not feeds:
            return
        seen: set[int] = set()
        total = 0
        for feed in feeds:
            s = self._seq(feed.seq)
            if feed.seq in seen:
                raise ValueError(f"sequence {feed.seq} appears twice in one decode")
            if len(feed.tokens) == 0:
                raise ValueError(f"no tokens for sequence {feed.seq}")
            if s.n + len(feed.tokens) > self.n_ctx_seq:
                raise EngineError(f"sequence {feed.seq}", f"{s.n + len(feed.tokens):,} tokens do not fit its "
                                                          f"{self.n_ctx_seq:,}-token context")
            seen.add(feed.seq)
            total += len(feed.tokens)
        if total > self.n_batch:
            raise ValueError(f"{total} tokens in one decode; the batch holds {self.n_batch}")
        b, parts, i = self._batch, [], 0
        for feed in feeds:
            n, start = len(feed.tokens), self._seqs[feed.seq].n
            b.token[i : i + n] = feed.tokens
            b.pos[i : i + n] = np.arange(start, start + n)
            b.seq[i : i + n] = feed.seq
            b.logits[i : i + n] = 0
            b.logits[i + n - 1] = feed.logits
            parts.append((feed.seq, i, n, feed.logits))
            i += n
        self._submit(total, parts)

    def sample(self, seq: int) -> int:
        """Sample sequence `seq`'s next token from the logits of its last token in the last decode, with its
        sampler (which then remembers the token for its repeat penalty). Once per decode."""
        chain = self._samplers.get(seq)
        if chain is None:
            raise ValueError(f"sequence {seq} has no sampler: call set_sampler first")
        index = self._outputs.pop(seq, None)
        if index is None:
            raise ValueError(f"sequence {seq} has no logits to sample: decode its last token with logits first")
        return int(self._lc.llama_sampler_sample(chain, self._ctx, index))

    def logits(self, seq: int) -> np.ndarray:
        """The logits `sample(seq)` would sample from (a copy, n_vocab floats); before sampling."""
        index = self._outputs.get(seq)
        if index is None:
            raise ValueError(f"sequence {seq} has no logits: decode its last token with logits first")
        return np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self._ctx, index), shape=(self.n_vocab,)).copy()

    def _submit(self, n_tokens: int, parts: list[tuple[int, int, int, bool]]) -> None:
        """Decode the batch's first `n_tokens`; `parts` are (sequence, batch offset, count, logits)."""
        b = self._batch
        b.struct.n_tokens = n_tokens
        self._outputs.clear()
        rc = self._lc.llama_decode(self._ctx, b.struct)
        if rc != 0:
            self._decode_failed(rc, parts)
        self._pending_copies.clear()
        for seq, offset, count, logits in parts:
            s = self._seqs[seq]
            s.tokens[s.n : s.n + count] = b.token[offset : offset + count]
            s.appended(count, self._blocks)
            if logits:
                self._outputs[seq] = offset + count - 1

    def _decode_failed(self, rc: int, parts: list[tuple[int, int, int, bool]]) -> None:
        # after an abort or a fatal error the ubatches already processed stay in the cache: take what llama.cpp
        # holds as the truth (the batch's tokens for them are still in the batch arrays)
        b = self._batch
        for seq, offset, count, _ in parts:
            s = self._seqs[seq]
            held = self._lc.llama_memory_seq_pos_max(self._mem, seq) + 1
            added = min(max(held - s.n, 0), count)
            if added:
                s.tokens[s.n : s.n + added] = b.token[offset : offset + added]
                s.appended(added, self._blocks)
        problem = _DECODE_FAILURES.get(rc, "fatal error")
        raise EngineError(str(self.config.model_path),
                          f"llama_decode failed ({rc}: {_log.detail(problem)})")

    def _flush_copies(self, seq: int) -> None:
        """Make llama.cpp write a pending copy into `seq`'s buffer (it does so at the start of a decode): decode
        one token past the end of some sequence with room, then drop it."""
        if seq not in self._pending_copies:
            return
        room = next((i for i, s in enumerate(self._seqs) if s.n < self.n_ctx_seq), None)
        if room is None:
            raise EngineError("KV cache", "every sequence is full; cannot complete a copy between sequences")
        s = self._seqs[room]
        b = self._batch
        b.token[0], b.pos[0], b.seq[0], b.logits[0] = 0, s.n, room, 0
        b.struct.n_tokens = 1
        self._outputs.clear()
        rc = self._lc.llama_decode(self._ctx, b.struct)
        self._lc.llama_memory_seq_rm(self._mem, room, s.n, -1)
        if rc != 0:
            raise EngineError(str(self.config.model_path), f"llama_decode failed ({rc}: {_log.detail('copy')})")
        self._pending_copies.clear()

    # -- prompts and replies ------------------------------------------------------------------------------------
    def plan_prompt(self, seq: int, prompt_tokens: list[int], *, chunk: int = 512, sample: bool = True,
                    pad_short_batches: bool = True) -> PromptPlan:
        """Keep the longest prefix of `prompt_tokens` that sequence `seq` holds (dropping the rest of what it holds)
        and split what is left into the chunks to decode, in order. With `sample`, the last prompt token is always
        decoded again (sampling needs its logits from a live decode): feed the last chunk with logits. On a CPU with
        flash attention no chunk has 2 to 63 tokens (see `_small_batches_are_slow`) unless `pad_short_batches` is
        off: cached tokens are evaluated again, or the last chunk borrows from the one before."""
        self._seq(seq)
        if not prompt_tokens:
            raise ValueError("needs at least one prompt token")
        if len(prompt_tokens) >= self.n_ctx_seq:
            raise EngineError("prompt", f"{len(prompt_tokens)} tokens do not fit the {self.n_ctx_seq}-token context")
        slow = pad_short_batches and self._small_batches_are_slow
        keep = min(self.common_prefix(seq, prompt_tokens), len(prompt_tokens) - sample)
        short = len(prompt_tokens) - keep
        if slow and 1 < short < CPU_FA_TILE:
            keep = max(0, keep - (CPU_FA_TILE - short))  # evaluate cached tokens again: one tile is cheaper
        reused = self.seq_truncate(seq, keep)
        pending = prompt_tokens[reused:]
        step = max(1, min(chunk, self.n_batch))
        if slow:
            step = min(step, self.config.n_ubatch)  # each decode one ubatch, so that only the last can be short
        bounds = list(range(0, len(pending), step)) + [len(pending)]
        tail = bounds[-1] - bounds[-2] if len(bounds) > 2 else 0
        if slow and 1 < tail < CPU_FA_TILE and step >= 2 * CPU_FA_TILE:
            bounds[-2] = bounds[-1] - CPU_FA_TILE  # no slow short batch at the end: borrow from the one before
        return PromptPlan(reused, [pending[a:b] for a, b in zip(bounds, bounds[1:])])

    @property
    def _small_batches_are_slow(self) -> bool:
        """llama.cpp's CPU flash attention takes its tiled path only for batches of CPU_FA_TILE tokens or more;
        2 to 63 go row by row over the whole cache (0.86 s for 32 tokens against 0.28 s for 64 at 3K tokens cached,
        docs/performance.md)."""
        return self.config.flash_attn and self.config.n_gpu_layers == 0

    def _eval(self, seq: int, tokens: Sequence[int], logits: bool) -> None:
        """Append `tokens` (at most one batch) to sequence `seq` in one llama_decode."""
        n, b = len(tokens), self._batch
        start = self._seqs[seq].n
        b.token[:n] = tokens
        b.pos[:n] = np.arange(start, start + n)
        b.seq[:n] = seq
        b.logits[:n] = 0
        b.logits[n - 1] = logits
        self._submit(n, [(seq, 0, n, logits)])

    def _prefill_steps(self, seq: int, plan: PromptPlan, cancel: threading.Event | None, *,
                       logits: bool = False) -> Iterator[PrefillProgress]:
        done, total = 0, plan.n_tokens
        for i, chunk in enumerate(plan.chunks):
            if cancel is not None and cancel.is_set():
                return
            self._eval(seq, chunk, logits and i == len(plan.chunks) - 1)
            done += len(chunk)
            yield PrefillProgress(done=done, total=total)

    def prefill(self, tokens: list[int], *, seq: int = 0, cancel: threading.Event | None = None,
                chunk: int = 512) -> Iterator[PrefillProgress]:
        """Bring a sequence's cache to `tokens` without sampling —
        e.g. a document as soon as it is added. Cancelling leaves the part already evaluated cached."""
        yield from self._prefill_steps(seq, self.plan_prompt(seq, tokens, chunk=chunk, sample=False), cancel)

    def generate(
        self,
        prompt_tokens: list[int],
        sampling: Sampling,
        *,
        seq: int = 0,
        stop_tokens: set[int] | None = None,
        cancel: threading.Event | None = None,
        prefill_chunk: int = 512,
        ignore_eog: bool = False,
        pad_short_batches: bool = True,
    ) -> Iterator[GenerateEvent]:
        """Stream one reply on sequence `seq`. `pad_short_batches=False` evaluates exactly the new tokens even where
        llama.cpp is slow for short batches (benchmarks measure llama.cpp as it is). Other sequences may be decoded
        between two records: each token is sampled right after the decode that made its logits."""
        stop_tokens = stop_tokens or set()
        start = time.perf_counter()
        plan = self.plan_prompt(seq, prompt_tokens, chunk=prefill_chunk, pad_short_batches=pad_short_batches)
        reused = plan.reused

        def finished(reason: str, completion: int, first_token_at: float | None, prefill_s: float) -> Finished:
            now = time.perf_counter()
            gen_s = now - first_token_at if first_token_at is not None else 0.0
            return Finished(
                reason=reason, prompt_tokens=len(prompt_tokens), reused_tokens=reused, completion_tokens=completion,
                time_to_first_token_s=(first_token_at if first_token_at is not None else now) - start,
                prefill_tokens_per_s=_rate(plan.n_tokens, prefill_s), gen_tokens_per_s=_rate(completion - 1, gen_s),
            )

        s = self._seqs[seq]
        yield from self._prefill_steps(seq, plan, cancel, logits=True)
        if s.n < len(prompt_tokens):  # cancelled between chunks
            yield finished("cancelled", 0, None, time.perf_counter() - start)
            return
        if seq not in self._outputs:  # another sequence was decoded after the last chunk: its logits are gone
            last = int(s.tokens[s.n - 1])
            if self.seq_truncate(seq, s.n - 1) != len(prompt_tokens) - 1:
                raise EngineError(f"sequence {seq}", "llama.cpp could not drop its last token to evaluate it again")
            self._eval(seq, [last], True)
        prefill_s = time.perf_counter() - start

        self.set_sampler(seq, sampling)
        # the loop below runs once per token: names bound locally, the batch's arrays written in place
        lc, ctx, chain, b, outputs, pieces = self._lc, self._ctx, self._samplers[seq], self._batch, self._outputs, \
            self._pieces
        decode, sample, is_eog, token_bytes = lc.llama_decode, lc.llama_sampler_sample, self.is_eog, self.token_bytes
        batch, token_ids, positions, seq_ids, wants_logits = b.struct, b.token, b.pos, b.seq, b.logits
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        completion = 0
        unsent = 0  # tokens whose bytes wait in the decoder for the rest of a UTF-8 sequence
        first_token_at: float | None = None
        reason = "length"
        room = min(sampling.max_tokens, self.n_ctx_seq - s.n)
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif room > 0:
            token = sample(chain, ctx, outputs.pop(seq))
            first_token_at = time.perf_counter()
            while True:
                completion += 1
                # Every sampled token enters the cache, stop tokens included, so the next turn reuses all of it.
                n = s.n
                token_ids[0], positions[0], seq_ids[0], wants_logits[0] = token, n, seq, 1
                batch.n_tokens = 1
                outputs.clear()
                rc = decode(ctx, batch)
                if rc != 0:
                    self._decode_failed(rc, [(seq, 0, 1, True)])
                s.tokens[n] = token
                if s.extendable and s.runs[-1][2] == n:
                    s.runs[-1][2] += 1
                    s.n = n + 1
                else:
                    s.appended(1, self._blocks)
                if token in stop_tokens or (not ignore_eog and is_eog(token)):
                    reason = "stop"
                    break
                unsent += 1
                text = decoder.decode(pieces.get(token) or token_bytes(token))
                if completion >= room:
                    if text:
                        yield TextChunk(text=text, n_tokens=unsent)
                        unsent = 0
                    break
                # sampled before anything is yielded: a caller may decode other sequences in between
                token = sample(chain, ctx, 0)
                if text:
                    yield TextChunk(text=text, n_tokens=unsent)
                    unsent = 0
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
        tail = decoder.decode(b"", final=True)
        if tail:
            yield TextChunk(text=tail, n_tokens=unsent)
        yield finished(reason, completion, first_token_at, prefill_s)

    # -- state files and snapshots ------------------------------------------------------------------------------
    def save_state(self, path: Path, *, seq: int = 0) -> None:
        """Write a sequence's KV cache and tokens to `path` (llama_state_seq_save_file), atomically."""
        s = self._seq(seq)
        self._flush_copies(seq)
        lc = self._lc
        partial = path.with_name(path.name + ".partial")
        _log.errors.clear()
        ok = lc.llama_state_seq_save_file(self._ctx, os.fsencode(partial), seq,
                                          s.tokens.ctypes.data_as(ctypes.POINTER(lc.llama_token)), s.n)
        if not ok:
            partial.unlink(missing_ok=True)
            raise EngineError(str(path), f"llama.cpp could not write the session state ({_log.detail('no reason')})")
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)

    def load_state(self, path: Path, *, seq: int = 0) -> int:
        """Replace a sequence's cache with the one saved in `path`; return how many tokens it holds."""
        s = self._seq(seq)
        if not path.is_file():
            raise EngineError(str(path), "no such session state file")
        self._flush_copies(seq)  # a queued copy into this sequence would overwrite what is loaded
        self.seq_clear(seq)
        lc = self._lc
        count = ctypes.c_size_t(0)
        tokens = np.zeros(self.n_ctx_seq, dtype=np.int32)
        ok = lc.llama_state_seq_load_file(self._ctx, os.fsencode(path), seq,
                                          tokens.ctypes.data_as(ctypes.POINTER(lc.llama_token)), self.n_ctx_seq,
                                          ctypes.byref(count))
        n = count.value
        if not ok or lc.llama_memory_seq_pos_max(self._mem, seq) + 1 != n:
            lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            _log.errors.clear()
            raise EngineError(str(path), "not a session state for this model and context size")
        s.tokens[:n] = tokens[:n]
        s.appended(n, self._blocks)
        return n

    def snapshot(self, seq: int) -> SequenceState:
        """A sequence's KV cache and tokens in memory (llama_state_seq_get_data)."""
        s = self._seq(seq)
        self._flush_copies(seq)
        lc = self._lc
        size = lc.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self._ctx, buf, size, seq)
        if size and not written:
            raise EngineError(f"sequence {seq}", f"llama.cpp could not copy its state ({_log.detail('no reason')})")
        return SequenceState(tuple(s.tokens[: s.n].tolist()), ctypes.string_at(buf, written))

    def restore(self, state: SequenceState, seq: int) -> int:
        """Replace a sequence's cache with a snapshot (of this model and context configuration)."""
        s = self._seq(seq)
        n = len(state.tokens)
        if n > self.n_ctx_seq:
            raise EngineError(f"sequence {seq}", f"a {n:,}-token snapshot does not fit its {self.n_ctx_seq:,} tokens")
        self._flush_copies(seq)  # a queued copy into this sequence would overwrite what is restored
        self.seq_clear(seq)
        lc = self._lc
        data = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        ok = lc.llama_state_seq_set_data(self._ctx, data, len(state.data), seq)
        if not ok or lc.llama_memory_seq_pos_max(self._mem, seq) + 1 != n:
            lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            _log.errors.clear()
            raise EngineError(f"sequence {seq}", "not a sequence state for this model and context")
        s.tokens[:n] = state.tokens
        s.appended(n, self._blocks)
        return n

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        lc = self._lc
        for chain in self._samplers.values():
            lc.llama_sampler_free(chain)
        self._samplers.clear()
        ctx, self._ctx = self._ctx, None
        if ctx:
            lc.llama_free(ctx)
        model, self._model = self._model, None
        if model:
            lc.llama_model_free(model)

    def __del__(self) -> None:
        if getattr(self, "_lc", None) is not None and (getattr(self, "_ctx", None) or getattr(self, "_model", None)):
            self.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
