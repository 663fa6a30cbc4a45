"""The llama.cpp engine: one model and one context holding `n_seq` sequences, driven through llama.cpp's C API
(llama_cpp's low-level ctypes bindings of llama.h). `Engine` composes the parts, each in its module:

- `library`: llama.cpp's log (quiet, errors kept for the one-line `EngineError`), the version check, backend init;
- `params`, `backends`: the model and context parameters (llama-cpp-python's `Llama`'s but the YaRN factors) and
  the ggml devices they name; `bindings`: the one ctypes table of what llama_cpp does not bind;
- `vocab`: tokenizer, token pieces, special and end-of-generation tokens, metadata;
- `sequences`: each sequence's tokens and KV cells, copies between sequences, the batch;
- `step`: `plan_prompt`, `decode`, `sample`, `logits` — the step API `lcrun.generation`'s one decode loop drives;
- `sampler`: one sampler chain per sequence, `grammar` its grammar (JSON schemas, tool calls) beside it;
- `state`: state files and in-memory snapshots of a sequence.

The engine generates nothing by itself: requests go through `lcrun.generation`. llama_cpp is imported inside
`Engine.__init__`, so importing this module stays cheap.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcrun.errors import EngineError

from . import state as state_io
from .library import log, start_llama
from .params import context_params, model_params
from .protocol import EngineConfig, Feed, Grammar, PromptPlan, Sampling, SequenceState
from .sampler import SamplerChains
from .sequences import Batch, Sequences
from .step import Steps
from .vocab import Vocabulary, model_metadata


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        import llama_cpp

        lc = self._lc = llama_cpp
        self.config = config
        self._model: Any = None
        self._ctx: Any = None
        self._samplers: SamplerChains | None = None
        start_llama(lc)
        path = Path(config.model_path)
        if not path.is_file():
            raise EngineError(str(path), "no such model file")
        max_seq = lc.llama_max_parallel_sequences()
        if not 1 <= config.n_seq <= max_seq:
            raise EngineError(f"{config.n_seq} sequences", f"llama.cpp holds 1 to {max_seq} in one context")
        cparams, mparams = context_params(config), model_params(config)
        log.errors.clear()
        self._model = lc.llama_model_load_from_file(os.fsencode(path), mparams)
        if not self._model:
            raise EngineError(str(path), f"llama.cpp could not load the model ({log.detail('no reason given')})")
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            detail = log.detail("no reason given")
            self.close()
            raise EngineError(str(path), f"llama.cpp could not create a {config.n_ctx:,}-token context ({detail})")
        if config.devices:
            from .rpc import endpoint_of, keep_alive

            # a worker whose machine vanishes ends the run (one line) instead of hanging it
            keep_alive([e for e in map(endpoint_of, config.devices) if e is not None])
        self.n_ctx: int = lc.llama_n_ctx(self._ctx)
        self.n_ctx_seq: int = lc.llama_n_ctx_seq(self._ctx)
        self.n_seq: int = lc.llama_n_seq_max(self._ctx)
        self.n_batch: int = lc.llama_n_batch(self._ctx)
        self.n_ctx_train: int = lc.llama_model_n_ctx_train(self._model)
        self.metadata: dict[str, str] = model_metadata(lc, self._model)
        self._vocab = Vocabulary(lc, self._model)
        self.n_vocab: int = self._vocab.n_vocab
        batch = Batch(lc, self.n_batch)
        self._seqs = Sequences(lc, self._ctx, batch, n_seq=self.n_seq, n_ctx_seq=self.n_ctx_seq,
                               kv_unified=config.kv_unified, where=str(config.model_path))
        self._samplers = SamplerChains(lc, self.n_vocab, self._ctx, lc.llama_model_get_vocab(self._model))
        self._steps = Steps(lc, self._ctx, config, batch, self._seqs, self._samplers, self.n_vocab)
        # called once per generated token: the parts' methods themselves, without the delegating call (the class's
        # methods below say what they are)
        self.decode = self._steps.decode  # type: ignore[method-assign]
        self.sample = self._steps.sample  # type: ignore[method-assign]
        self.is_eog = self._vocab.is_eog  # type: ignore[method-assign]
        self.token_bytes = self._vocab.token_bytes  # type: ignore[method-assign]

    # -- the model and its vocabulary -----------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def add_bos(self) -> bool:
        """Whether prompts start with BOS (llama.cpp adds it when tokenizing with add_special)."""
        return self._vocab.add_bos

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        return self._vocab.tokenize(text, special=special, add_bos=add_bos)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    def token_text(self, token: int) -> str:
        return self._vocab.token_text(token)

    def token_bytes(self, token: int) -> bytes:
        return self._vocab.token_bytes(token)

    def special_tokens(self) -> dict[str, int]:
        """bos, eos and eot ids the vocabulary defines (absent ones left out)."""
        return self._vocab.special_tokens()

    def is_eog(self, token: int) -> bool:
        return self._vocab.is_eog(token)

    # -- sequences ------------------------------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> list[int]:
        return self._seqs.tokens(0)

    def seq_tokens(self, seq: int) -> list[int]:
        return self._seqs.tokens(seq)

    def seq_len(self, seq: int) -> int:
        return self._seqs.get(seq).n

    def common_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """How many of `tokens` sequence `seq` holds already, from the start."""
        return self._seqs.common_prefix(seq, tokens)

    def seq_truncate(self, seq: int, keep: int) -> int:
        """Drop a sequence's tokens from position `keep` on; return how many stay (0 when llama.cpp cannot remove
        part of it)."""
        return self._seqs.truncate(seq, keep)

    def seq_clear(self, seq: int) -> None:
        self._seqs.truncate(seq, 0)

    def seq_copy(self, src: int, dst: int, n: int | None = None) -> None:
        """Make sequence `dst` hold the first `n` tokens of `src` (all by default) — their KV cells too, so a
        prompt on `dst` that starts with them evaluates only the rest. With a unified KV cache the cells are shared;
        otherwise llama.cpp copies `src`'s buffer into `dst`'s at the next decode (saving, snapshotting, loading or
        restoring `dst` before then runs a one-token decode to get it done, which drops the last decode's logits)."""
        self._seqs.copy(src, dst, n)

    def kv_cells_used(self) -> int:
        """KV cells holding some sequence's tokens (a shared prefix counts once)."""
        return self._seqs.kv_cells_used()

    # -- the step API ---------------------------------------------------------------------------------------------
    def plan_prompt(self, seq: int, prompt_tokens: list[int], *, chunk: int = 512, sample: bool = True,
                    pad_short_batches: bool = True) -> PromptPlan:
        return self._steps.plan_prompt(seq, prompt_tokens, chunk=chunk, sample=sample,
                                       pad_short_batches=pad_short_batches)

    def set_sampler(self, seq: int, sampling: Sampling, grammar: Grammar | None = None) -> None:
        """Give sequence `seq` a fresh sampler chain (penalty history empty) for `sampling`, and `grammar`'s
        sampler beside it (GrammarError when llama.cpp cannot compile it)."""
        self._seqs.get(seq)
        assert self._samplers is not None
        self._samplers.set(seq, sampling, grammar)

    def check_grammar(self, grammar: Grammar) -> None:
        """GrammarError naming the problem when llama.cpp cannot compile `grammar`; the vocabulary's index for
        grammars built here the first time, so the thread that decodes does not pay for it. Safe from any thread:
        it reads only the vocabulary."""
        from .grammar import init_grammar

        self._lc.llama_sampler_free(init_grammar(self._lc, self._lc.llama_model_get_vocab(self._model), grammar))
        assert self._samplers is not None
        self._samplers.index().build()

    def decode(self, feeds: Sequence[Feed]) -> None:
        self._steps.decode(feeds)

    def sample(self, seq: int) -> int:
        return self._steps.sample(seq)

    def logits(self, seq: int) -> np.ndarray:
        return self._steps.logits(seq)

    def copy_logits(self, src: int, dst: int) -> None:
        self._steps.copy_logits(src, dst)

    # -- state files and snapshots --------------------------------------------------------------------------------
    def save_state(self, path: Path, *, seq: int = 0) -> None:
        """Write a sequence's KV cache and tokens to `path` (llama_state_seq_save_file), atomically."""
        state_io.save_state(self._lc, self._ctx, self._seqs, path, seq)

    def load_state(self, path: Path, *, seq: int = 0) -> int:
        """Replace a sequence's cache with the one saved in `path`; return how many tokens it holds."""
        return state_io.load_state(self._lc, self._ctx, self._seqs, path, seq)

    def snapshot(self, seq: int) -> SequenceState:
        """A sequence's KV cache and tokens in memory (llama_state_seq_get_data)."""
        return state_io.snapshot(self._lc, self._ctx, self._seqs, seq)

    def restore(self, state: SequenceState, seq: int) -> int:
        """Replace a sequence's cache with a snapshot (of this model and context configuration)."""
        return state_io.restore(self._lc, self._ctx, self._seqs, state, seq)

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        lc = self._lc
        if self._samplers is not None:
            self._samplers.close()
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
