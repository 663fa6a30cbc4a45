"""A sequence's KV cache and tokens saved and brought back: to a file (llama_state_seq_save_file / load_file, for a
chat's --session) or in memory (llama_state_seq_get_data / set_data, for serve's disk prompt cache). A state belongs
to one model and context configuration; anything else is refused in one line and leaves the sequence empty."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from lcrun.atomic_files import atomic_output
from lcrun.errors import EngineError

from .library import log
from .protocol import SequenceState
from .sequences import Sequences


def save_state(lc: Any, ctx: Any, seqs: Sequences, path: Path, seq: int) -> None:
    """Write a sequence's KV cache and tokens to `path`, atomically (llama.cpp writes the partial file)."""
    s = seqs.get(seq)
    seqs.flush_copies(seq)
    log.errors.clear()
    with atomic_output(path) as partial:
        ok = lc.llama_state_seq_save_file(ctx, os.fsencode(partial), seq,
                                          s.tokens.ctypes.data_as(ctypes.POINTER(lc.llama_token)), s.n)
        if not ok:
            raise EngineError(str(path), f"llama.cpp could not write the session state ({log.detail('no reason')})")


def load_state(lc: Any, ctx: Any, seqs: Sequences, path: Path, seq: int) -> int:
    """Replace a sequence's cache with the one saved in `path`; return how many tokens it holds."""
    s = seqs.get(seq)
    if not path.is_file():
        raise EngineError(str(path), "no such session state file")
    seqs.flush_copies(seq)  # a queued copy into this sequence would overwrite what is loaded
    seqs.truncate(seq, 0)
    count = ctypes.c_size_t(0)
    tokens = np.zeros(seqs.n_ctx_seq, dtype=np.int32)
    ok = lc.llama_state_seq_load_file(ctx, os.fsencode(path), seq,
                                      tokens.ctypes.data_as(ctypes.POINTER(lc.llama_token)), seqs.n_ctx_seq,
                                      ctypes.byref(count))
    n = count.value
    if not ok or lc.llama_memory_seq_pos_max(seqs.mem, seq) + 1 != n:
        lc.llama_memory_seq_rm(seqs.mem, seq, -1, -1)
        log.errors.clear()
        raise EngineError(str(path), "not a session state for this model and context size")
    s.tokens[:n] = tokens[:n]
    s.appended(n, seqs.new_block)
    return n


def snapshot(lc: Any, ctx: Any, seqs: Sequences, seq: int) -> SequenceState:
    """A sequence's KV cache and tokens in memory."""
    s = seqs.get(seq)
    seqs.flush_copies(seq)
    size = lc.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * size)()
    written = lc.llama_state_seq_get_data(ctx, buf, size, seq)
    if size and not written:
        raise EngineError(f"sequence {seq}", f"llama.cpp could not copy its state ({log.detail('no reason')})")
    return SequenceState(tuple(s.tokens[: s.n].tolist()), ctypes.string_at(buf, written))


def restore(lc: Any, ctx: Any, seqs: Sequences, state: SequenceState, seq: int) -> int:
    """Replace a sequence's cache with a snapshot (of this model and context configuration)."""
    s = seqs.get(seq)
    n = len(state.tokens)
    if n > seqs.n_ctx_seq:
        raise EngineError(f"sequence {seq}", f"a {n:,}-token snapshot does not fit its {seqs.n_ctx_seq:,} tokens")
    seqs.flush_copies(seq)  # a queued copy into this sequence would overwrite what is restored
    seqs.truncate(seq, 0)
    data = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
    ok = lc.llama_state_seq_set_data(ctx, data, len(state.data), seq)
    if not ok or lc.llama_memory_seq_pos_max(seqs.mem, seq) + 1 != n:
        lc.llama_memory_seq_rm(seqs.mem, seq, -1, -1)
        log.errors.clear()
        raise EngineError(f"sequence {seq}", "not a sequence state for this model and context")
    s.tokens[:n] = state.tokens
    s.appended(n, seqs.new_block)
    return n
