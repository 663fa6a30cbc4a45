"""The step API that every generation is built on (lcrun.generation drives it): `plan_prompt` decides what of a
prompt a sequence already holds and how to evaluate the rest; `decode` appends several sequences' tokens in one
`llama_decode`; `sample` draws a sequence's next token from its logits with its own sampler chain; `logits` reads
them before that."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lcrun.errors import EngineError

from .protocol import EngineConfig, Feed, PromptPlan
from .sampler import SamplerChains
from .sequences import Batch, Part, Sequences

CPU_FA_TILE = 64  # GGML_FA_TILE_Q in llama.cpp's ggml-cpu (llama-cpp-python 0.3.36)


class Steps:
    def __init__(self, lc: Any, ctx: Any, config: EngineConfig, batch: Batch, seqs: Sequences,
                 samplers: SamplerChains, n_vocab: int) -> None:
        self._lc, self._ctx, self._config = lc, ctx, config
        self._batch, self._seqs, self._samplers, self._n_vocab = batch, seqs, samplers, n_vocab
        # llama.cpp's CPU flash attention takes its tiled path only for batches of CPU_FA_TILE tokens or more; 2 to
        # 63 go row by row over the whole cache (0.86 s for 32 tokens against 0.28 s for 64 at 3K tokens cached,
        # docs/performance.md)
        self.small_batches_are_slow = config.flash_attn and config.n_gpu_layers == 0

    def plan_prompt(self, seq: int, prompt_tokens: list[int], *, chunk: int = 512, sample: bool = True,
                    pad_short_batches: bool = True) -> PromptPlan:
        """Keep the longest prefix of `prompt_tokens` that sequence `seq` holds (dropping the rest of what it holds)
        and split what is left into the chunks to decode, in order. With `sample`, the last prompt token is always
        decoded again (sampling needs its logits from a live decode): feed the last chunk with logits. On a CPU with
        flash attention no chunk has 2 to 63 tokens unless `pad_short_batches` is off: cached tokens are evaluated
        again, or the last chunk borrows from the one before."""
        seqs = self._seqs
        seqs.get(seq)
        if not prompt_tokens:
            raise ValueError("needs at least one prompt token")
        if len(prompt_tokens) >= seqs.n_ctx_seq:
            raise EngineError("prompt", f"{len(prompt_tokens)} tokens do not fit the {seqs.n_ctx_seq}-token context")
        slow = pad_short_batches and self.small_batches_are_slow
        keep = min(seqs.common_prefix(seq, prompt_tokens), len(prompt_tokens) - sample)
        short = len(prompt_tokens) - keep
        if slow and 1 < short < CPU_FA_TILE:
            keep = max(0, keep - (CPU_FA_TILE - short))  # evaluate cached tokens again: one tile is cheaper
        reused = seqs.truncate(seq, keep)
        pending = prompt_tokens[reused:]
        step = max(1, min(chunk, self._batch.capacity))
        if slow:
            step = min(step, self._config.n_ubatch)  # each decode one ubatch, so that only the last can be short
        bounds = list(range(0, len(pending), step)) + [len(pending)]
        tail = bounds[-1] - bounds[-2] if len(bounds) > 2 else 0
        if slow and 1 < tail < CPU_FA_TILE and step >= 2 * CPU_FA_TILE:
            bounds[-2] = bounds[-1] - CPU_FA_TILE  # no slow short batch at the end: borrow from the one before
        return PromptPlan(reused, [pending[a:b] for a, b in zip(bounds, bounds[1:])])

    def decode(self, feeds: Sequence[Feed]) -> None:
        """One llama_decode appending each feed's tokens to its sequence. The logits of the previous decode are
        gone afterwards: sample what you need before the next one."""
        if not feeds:
            return
        seqs, b = self._seqs, self._batch
        if len(feeds) == 1 and len(feeds[0].tokens) == 1:
            feed = feeds[0]
            self._decode_one(feed.seq, feed.tokens[0], feed.logits)
            return
        n_ctx_seq = seqs.n_ctx_seq
        total = sum(len(feed.tokens) for feed in feeds)
        if total > b.capacity:
            raise ValueError(f"{total} tokens in one decode; the batch holds {b.capacity}")
        parts: list[Part] = []
        seen: set[int] = set()
        i = 0
        for feed in feeds:
            seq, tokens = feed.seq, feed.tokens
            s = seqs.get(seq)
            n = len(tokens)
            if seq in seen:
                raise ValueError(f"sequence {seq} appears twice in one decode")
            if n == 0:
                raise ValueError(f"no tokens for sequence {seq}")
            start = s.n
            if start + n > n_ctx_seq:
                raise EngineError(f"sequence {seq}", f"{start + n:,} tokens do not fit its {n_ctx_seq:,}-token "
                                                     "context")
            seen.add(seq)
            if n == 1:  # a generating sequence's next token: scalars are cheaper than slices
                b.token[i], b.pos[i], b.seq[i], b.logits[i] = tokens[0], start, seq, feed.logits
            else:
                b.token[i : i + n] = tokens
                b.pos[i : i + n] = np.arange(start, start + n)
                b.seq[i : i + n] = seq
                b.logits[i : i + n] = 0
                b.logits[i + n - 1] = feed.logits
            parts.append((seq, i, n, feed.logits))
            i += n
        self._submit(total, parts)

    def _decode_one(self, seq: int, token: int, logits: bool) -> None:
        """`decode` of one sequence's next token — once per generated token while one reply streams, so written out
        in full here (the general path costs a few microseconds more a token)."""
        seqs, b = self._seqs, self._batch
        s = seqs.get(seq)
        n = s.n
        if n >= seqs.n_ctx_seq:
            raise EngineError(f"sequence {seq}", f"{n + 1:,} tokens do not fit its {seqs.n_ctx_seq:,}-token context")
        b.token[0], b.pos[0], b.seq[0], b.logits[0] = token, n, seq, logits
        b.struct.n_tokens = 1
        outputs = seqs.outputs
        outputs.clear()
        rc = self._lc.llama_decode(self._ctx, b.struct)
        if rc != 0:
            raise seqs.decode_failed(rc, [(seq, 0, 1, logits)])
        seqs.pending_copies.clear()
        s.tokens[n] = token
        if s.extendable and s.runs[-1][2] == n:
            s.runs[-1][2] = s.n = n + 1
        else:
            s.appended(1, seqs.new_block)
        if logits:
            outputs[seq] = 0

    def _submit(self, n_tokens: int, parts: list[Part]) -> None:
        seqs, b = self._seqs, self._batch
        b.struct.n_tokens = n_tokens
        seqs.outputs.clear()
        rc = self._lc.llama_decode(self._ctx, b.struct)
        if rc != 0:
            raise seqs.decode_failed(rc, parts)
        seqs.decoded(parts)

    def sample(self, seq: int) -> int:
        """Sample sequence `seq`'s next token from the logits of its last token in the last decode, with its
        sampler (which then remembers the token for its penalties) and its grammar, if it has one. Once per
        decode."""
        samplers = self._samplers
        chain = samplers.get(seq)
        index = self._seqs.outputs.pop(seq, None)
        if index is None:
            raise ValueError(f"sequence {seq} has no logits to sample: decode its last token with logits first")
        if samplers.grammars:
            grammar = samplers.grammars.get(seq)
            if grammar is not None:
                return grammar.sample(chain, index)
        return int(self._lc.llama_sampler_sample(chain, self._ctx, index))

    def copy_logits(self, src: int, dst: int) -> None:
        """Let `dst` sample from the logits `src` got in the last decode (several choices of one prompt)."""
        outputs = self._seqs.outputs
        self._seqs.get(dst)
        if src not in outputs:
            raise ValueError(f"sequence {src} has no logits to share")
        outputs[dst] = outputs[src]

    def logits(self, seq: int) -> np.ndarray:
        """The logits `sample(seq)` would sample from (a copy, n_vocab floats); before sampling."""
        index = self._seqs.outputs.get(seq)
        if index is None:
            raise ValueError(f"sequence {seq} has no logits: decode its last token with logits first")
        return np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,)).copy()
