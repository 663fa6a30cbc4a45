"""The sequences of one llama.cpp context and the batch that feeds them.

`Sequences` keeps, for each sequence, the tokens it holds (positions 0..n-1) — what prefix reuse compares against —
and which KV cells they occupy, removes and copies them through llama.cpp's memory API, and remembers which row of
the last decode's logits belongs to which sequence. `Batch` is one llama_batch over numpy arrays, written in place for
each decode."""
from __future__ import annotations

import ctypes
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from lcrun.errors import EngineError

from .library import log

DECODE_FAILURES = {1: "no free KV cells for the batch", 2: "aborted", -1: "invalid batch"}

Part = tuple[int, int, int, bool]   # (sequence, offset in the batch, tokens, logits of the last)


class Batch:
    """One llama_batch over numpy arrays (one sequence id per token), filled in place for each decode."""

    def __init__(self, lc: Any, capacity: int) -> None:
        self.capacity = capacity
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


class SequenceCells:
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


class Sequences:
    def __init__(self, lc: Any, ctx: Any, batch: Batch, *, n_seq: int, n_ctx_seq: int, kv_unified: bool,
                 where: str) -> None:
        self._lc, self._ctx, self._batch = lc, ctx, batch
        self.mem = lc.llama_get_memory(ctx)
        self.n_seq, self.n_ctx_seq, self.kv_unified = n_seq, n_ctx_seq, kv_unified
        self.where = where                      # what errors name: the model file
        self.cells = [SequenceCells(n_ctx_seq) for _ in range(n_seq)]
        self.new_block = itertools.count().__next__
        self.outputs: dict[int, int] = {}       # sequence → batch index of its logits in the last decode
        self.pending_copies: set[int] = set()   # sequences whose copied KV data llama.cpp writes at the next decode

    def get(self, seq: int) -> SequenceCells:
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence {seq} does not exist (this engine has {self.n_seq})")
        return self.cells[seq]

    def tokens(self, seq: int) -> list[int]:
        s = self.get(seq)
        return s.tokens[: s.n].tolist()

    def common_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        s = self.get(seq)
        n = min(s.n, len(tokens))
        differ = np.flatnonzero(s.tokens[:n] != np.asarray(tokens[:n], dtype=np.int32))
        return int(differ[0]) if differ.size else n

    def truncate(self, seq: int, keep: int) -> int:
        s = self.get(seq)
        keep = max(keep, 0)
        if keep < s.n:
            lc = self._lc
            if keep == 0 or not lc.llama_memory_seq_rm(self.mem, seq, keep, -1):
                lc.llama_memory_seq_rm(self.mem, seq, -1, -1)
                keep = 0
            s.cut(keep)
            self.outputs.pop(seq, None)
        return s.n

    def copy(self, src: int, dst: int, n: int | None = None) -> None:
        s, d = self.get(src), self.get(dst)
        n = s.n if n is None else n
        if not 0 <= n <= s.n:
            raise ValueError(f"sequence {src} holds {s.n} tokens, cannot copy {n}")
        if src == dst:
            self.truncate(dst, n)
            return
        self.truncate(dst, 0)
        if n == 0:
            return
        lc = self._lc
        if self.kv_unified:
            lc.llama_memory_seq_cp(self.mem, src, dst, 0, n)
            d.runs = [[block, start, min(stop, n)] for block, start, stop in s.runs if start < n]
            d.n, d.extendable = n, False
        else:
            # between separate buffers llama.cpp copies whole sequences only: copy all, then cut
            lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
            if n < s.n:
                lc.llama_memory_seq_rm(self.mem, dst, n, -1)
            self.pending_copies.add(dst)
            d.appended(n, self.new_block)
        d.tokens[:n] = s.tokens[:n]

    def kv_cells_used(self) -> int:
        extent: dict[int, tuple[int, int]] = {}
        for s in self.cells:
            for block, start, stop in s.runs:
                extent[block] = (start, max(stop, extent.get(block, (start, start))[1]))
        return sum(stop - start for start, stop in extent.values())

    # -- after a decode ---------------------------------------------------------------------------------------------
    def decoded(self, parts: list[Part]) -> None:
        """The batch's tokens of `parts` are in the cache now; their last rows' logits are readable."""
        b, outputs, new_block = self._batch, self.outputs, self.new_block
        self.pending_copies.clear()
        for seq, offset, count, logits in parts:
            s = self.cells[seq]
            if count == 1:
                s.tokens[s.n] = b.token[offset]
            else:
                s.tokens[s.n : s.n + count] = b.token[offset : offset + count]
            s.appended(count, new_block)
            if logits:
                outputs[seq] = offset + count - 1

    def decode_failed(self, rc: int, parts: list[Part]) -> EngineError:
        """After an abort or a fatal error the ubatches already processed stay in the cache: take what llama.cpp holds
        as the truth (the batch's tokens for them are still in the batch arrays). The error to raise."""
        b = self._batch
        for seq, offset, count, _ in parts:
            s = self.cells[seq]
            held = self._lc.llama_memory_seq_pos_max(self.mem, seq) + 1
            added = min(max(held - s.n, 0), count)
            if added:
                s.tokens[s.n : s.n + added] = b.token[offset : offset + added]
                s.appended(added, self.new_block)
        problem = DECODE_FAILURES.get(rc, "fatal error")
        return EngineError(self.where, f"llama_decode failed ({rc}: {log.detail(problem)})")

    def flush_copies(self, seq: int) -> None:
        """Make llama.cpp write a pending copy into `seq`'s buffer (it does so at the start of a decode): decode
        one token past the end of some sequence with room, then drop it."""
        if seq not in self.pending_copies:
            return
        room = next((i for i, s in enumerate(self.cells) if s.n < self.n_ctx_seq), None)
        if room is None:
            raise EngineError("KV cache", "every sequence is full; cannot complete a copy between sequences")
        s = self.cells[room]
        b = self._batch
        b.token[0], b.pos[0], b.seq[0], b.logits[0] = 0, s.n, room, 0
        b.struct.n_tokens = 1
        self.outputs.clear()
        rc = self._lc.llama_decode(self._ctx, b.struct)
        self._lc.llama_memory_seq_rm(self.mem, room, s.n, -1)
        if rc != 0:
            raise EngineError(self.where, f"llama_decode failed ({rc}: {log.detail('copy')})")
        self.pending_copies.clear()
