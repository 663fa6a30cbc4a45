"""One llama.cpp sampler chain per sequence, built as llama-cpp-python's `Llama` builds it for the same settings:
penalties, then greedy, or top-k / typical / top-p / min-p / temperature / dist with the request's seed — and, for a
request with a grammar, that grammar's sampler beside the chain (grammar.py: checked after the chain samples, as
llama.cpp's common_sampler does, rather than first in the chain over the whole vocabulary every token). One chain
per sequence, so each slot samples with its own."""
from __future__ import annotations

from typing import Any

import numpy as np

from .grammar import TOKEN_DATA, GrammarSampler, VocabularyIndex
from .protocol import Grammar, Sampling

REPEAT_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the penalties look this far back


def sampler_chain(lc: Any, n_vocab: int, sampling: Sampling) -> Any:
    """A new llama_sampler chain for `sampling` (the caller frees it)."""
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


class SamplerChains:
    """The chain of each sequence that has one, and its grammar if it has one; a new one replaces (and frees) the
    old, so its penalty history starts empty."""

    def __init__(self, lc: Any, n_vocab: int, ctx: Any = None, vocab: Any = None) -> None:
        self._lc = lc
        self._n_vocab = n_vocab
        self._ctx, self._vocab = ctx, vocab
        self._chains: dict[int, Any] = {}
        self.grammars: dict[int, GrammarSampler] = {}
        self._index: VocabularyIndex | None = None
        self._scratch: np.ndarray | None = None

    def index(self) -> VocabularyIndex:
        """What grammars need of the vocabulary (built on first use: ~0.8 s for 128K tokens)."""
        if self._index is None:
            self._index = VocabularyIndex(self._lc, self._vocab, self._n_vocab)
        return self._index

    def set(self, seq: int, sampling: Sampling, grammar: Grammar | None = None) -> None:
        self.drop(seq)
        if grammar is not None:
            if self._scratch is None:
                self._scratch = np.zeros(self._n_vocab, dtype=TOKEN_DATA)
            self.grammars[seq] = GrammarSampler(self._lc, self._ctx, self._vocab, self.index(), grammar,
                                                self._scratch)
        self._chains[seq] = sampler_chain(self._lc, self._n_vocab, sampling)

    def get(self, seq: int) -> Any:
        chain = self._chains.get(seq)
        if chain is None:
            raise ValueError(f"sequence {seq} has no sampler: call set_sampler first")
        return chain

    def drop(self, seq: int) -> None:
        old = self._chains.pop(seq, None)
        if old is not None:
            self._lc.llama_sampler_free(old)
        grammar = self.grammars.pop(seq, None)
        if grammar is not None:
            grammar.free()

    def close(self) -> None:
        for seq in list(self._chains):
            self.drop(seq)
