"""A long-lived llama.cpp session that keeps its KV cache between calls and streams typed records.

`Engine.generate` reuses the longest common prefix of the cached tokens and the new prompt, evaluates only the rest
in chunks (reporting progress, honouring cancellation between chunks), then samples token by token. llama_cpp is
imported inside `Engine.__init__`, so importing this module stays cheap.
"""
from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcrun.errors import EngineError


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    n_ctx: int
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    n_threads: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    seed: int = 0
    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None


@dataclass(frozen=True)
class TextChunk:
    text: str
    n_tokens: int


@dataclass(frozen=True)
class PrefillProgress:
    done: int
    total: int


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    reused_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    gen_tokens_per_s: float


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    seed: int = 0


GenerateEvent = PrefillProgress | TextChunk | Finished
CPU_FA_TILE = 64  # GGML_FA_TILE_Q in llama.cpp's ggml-cpu (llama-cpp-python 0.3.36)


def _ggml_type(name: str) -> int:
    from gguf import GGMLQuantizationType  # the enum values are ggml_type's

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        raise EngineError(str(name), "not a ggml type for the KV cache (try f16, q8_0, q4_0)") from None


def _rate(n: int, seconds: float) -> float:
    return n / seconds if n and seconds > 0 else 0.0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.config = config
        try:
            self._llm: Any = llama_cpp.Llama(
                model_path=str(config.model_path),
                n_ctx=config.n_ctx,
                n_gpu_layers=config.n_gpu_layers,
                n_batch=config.n_batch,
                n_ubatch=config.n_ubatch,
                n_threads=config.n_threads,
                seed=config.seed,
                flash_attn=config.flash_attn,
                type_k=_ggml_type(config.type_k),
                type_v=_ggml_type(config.type_v),
                rope_freq_base=config.rope_freq_base or 0.0,
                rope_freq_scale=config.rope_freq_scale or 0.0,
                # llama-cpp-python passes 1/32/1 explicitly; negative means "take the GGUF's YaRN values".
                yarn_attn_factor=-1.0,
                yarn_beta_fast=-1.0,
                yarn_beta_slow=-1.0,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as err:
            raise EngineError(str(config.model_path), f"llama.cpp could not load the model ({err})") from err
        self.n_ctx: int = self._llm.n_ctx()
        self.n_ctx_train: int = self._llm._model.n_ctx_train()
        self.metadata: dict[str, str] = dict(self._llm.metadata)
        self._pieces: dict[int, bytes] = {}  # token → its bytes: a token's piece never changes

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def token_text(self, token: int) -> str:
        return self._llama_cpp.llama_vocab_get_text(self._llm._model.vocab, token).decode("utf-8", errors="replace")

    @property
    def add_bos(self) -> bool:
        """Whether prompts start with BOS (llama.cpp adds it when tokenizing with add_special)."""
        return bool(self._llama_cpp.llama_vocab_get_add_bos(self._llm._model.vocab))

    def special_tokens(self) -> dict[str, int]:
        """bos, eos and eot ids the vocabulary defines (absent ones left out)."""
        lc, vocab = self._llama_cpp, self._llm._model.vocab
        found = {"bos": lc.llama_vocab_bos(vocab), "eos": lc.llama_vocab_eos(vocab), "eot": lc.llama_vocab_eot(vocab)}
        return {name: int(tok) for name, tok in found.items() if tok >= 0}

    @property
    def cached_tokens(self) -> list[int]:
        return [int(t) for t in self._llm.input_ids[: self._llm.n_tokens]]

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        # Chat templates spell out <|begin_of_text|> themselves, hence no BOS by default.
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._piece_bytes(tokens).decode("utf-8", errors="replace")

    def _piece_bytes(self, tokens: Sequence[int]) -> bytes:
        # llama-cpp-python's own token_to_piece/detokenize use a fixed 32-byte buffer; long pieces need more.
        lc, vocab, pieces = self._llama_cpp, self._llm._model.vocab, self._pieces
        out = bytearray()
        for token in tokens:
            piece = pieces.get(token)
            if piece is None:
                size = 64
                while True:
                    buf = ctypes.create_string_buffer(size)
                    n = lc.llama_token_to_piece(vocab, lc.llama_token(int(token)), buf, size, 0, False)
                    if n >= 0:
                        piece = pieces[token] = buf.raw[:n]
                        break
                    size = -n
            out += piece
        return bytes(out)

    def _is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    def _truncate_cache(self, keep: int) -> int:
        """Drop cached tokens from position `keep` on; return how many stay (0 when partial removal fails)."""
        llm = self._llm
        if keep < llm.n_tokens:
            if keep == 0 or not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
                llm._ctx.kv_cache_clear()
                keep = 0
            llm.n_tokens = keep
        return llm.n_tokens

    def _eval(self, tokens: Sequence[int]) -> None:
        try:
            self._llm.eval(list(tokens))
        except RuntimeError as err:
            raise EngineError(str(self.config.model_path), f"llama_decode failed ({err})") from err

    def _start(self, prompt_tokens: list[int], *, redo_last: bool = True,
               pad: bool = True) -> tuple[int, list[int]]:
        """Keep the longest cached prefix (for sampling, never the last prompt token: it needs its logits from a
        live decode); return how many tokens were reused and the rest to evaluate."""
        if not prompt_tokens:
            raise ValueError("needs at least one prompt token")
        if len(prompt_tokens) >= self.n_ctx:
            raise EngineError("prompt", f"{len(prompt_tokens)} tokens do not fit the {self.n_ctx}-token context")
        llm = self._llm
        n = min(llm.n_tokens, len(prompt_tokens))
        differ = np.flatnonzero(llm.input_ids[:n] != np.asarray(prompt_tokens[:n], dtype=llm.input_ids.dtype))
        common = int(differ[0]) if differ.size else n
        keep = min(common, len(prompt_tokens) - redo_last)
        short = len(prompt_tokens) - keep
        if pad and self._small_batches_are_slow and 1 < short < CPU_FA_TILE:
            keep = max(0, keep - (CPU_FA_TILE - short))  # evaluate cached tokens again: one tile is cheaper
        reused = self._truncate_cache(keep)
        return reused, prompt_tokens[reused:]

    @property
    def _small_batches_are_slow(self) -> bool:
        """llama.cpp's CPU flash attention takes its tiled path only for batches of CPU_FA_TILE tokens or more;
        2 to 63 go row by row over the whole cache (0.86 s for 32 tokens against 0.28 s for 64 at 3K tokens cached,
        docs/performance.md)."""
        return self.config.flash_attn and self.config.n_gpu_layers == 0

    def _prefill_steps(self, pending: list[int], cancel: threading.Event | None, chunk: int, *,
                       pad: bool = True) -> Iterator[PrefillProgress]:
        step = max(1, min(chunk, self._llm.n_batch))
        if pad and self._small_batches_are_slow:
            step = min(step, self.config.n_ubatch)  # each call one ubatch, so that only the last can be short
        bounds = list(range(0, len(pending), step)) + [len(pending)]
        tail = bounds[-1] - bounds[-2] if len(bounds) > 2 else 0
        if pad and self._small_batches_are_slow and 1 < tail < CPU_FA_TILE and step >= 2 * CPU_FA_TILE:
            bounds[-2] = bounds[-1] - CPU_FA_TILE  # no slow short batch at the end: borrow from the one before
        for start, stop in zip(bounds, bounds[1:]):
            if cancel is not None and cancel.is_set():
                return
            self._eval(pending[start:stop])
            yield PrefillProgress(done=stop, total=len(pending))

    def prefill(self, tokens: list[int], *, cancel: threading.Event | None = None,
                chunk: int = 512) -> Iterator[PrefillProgress]:
        """Bring the cache to `tokens` without sampling —
        e.g. a document as soon as it is added. Cancelling leaves the part already evaluated cached."""
        _reused, pending = self._start(tokens, redo_last=False)
        yield from self._prefill_steps(pending, cancel, chunk)

    def generate(
        self,
        prompt_tokens: list[int],
        sampling: Sampling,
        *,
        stop_tokens: set[int] | None = None,
        cancel: threading.Event | None = None,
        prefill_chunk: int = 512,
        ignore_eog: bool = False,
        pad_short_batches: bool = True,
    ) -> Iterator[GenerateEvent]:
        """Stream one reply. `pad_short_batches=False` evaluates exactly the new tokens even where llama.cpp is slow
        for short batches (benchmarks measure llama.cpp as it is)."""
        llm = self._llm
        stop_tokens = stop_tokens or set()
        start = time.perf_counter()
        reused, pending = self._start(prompt_tokens, pad=pad_short_batches)

        def finished(reason: str, completion: int, first_token_at: float | None, prefill_s: float) -> Finished:
            now = time.perf_counter()
            gen_s = now - first_token_at if first_token_at is not None else 0.0
            return Finished(
                reason=reason, prompt_tokens=len(prompt_tokens), reused_tokens=reused, completion_tokens=completion,
                time_to_first_token_s=(first_token_at if first_token_at is not None else now) - start,
                prefill_tokens_per_s=_rate(len(pending), prefill_s), gen_tokens_per_s=_rate(completion - 1, gen_s),
            )

        for progress in self._prefill_steps(pending, cancel, prefill_chunk, pad=pad_short_batches):
            yield progress
        if llm.n_tokens < len(prompt_tokens):  # cancelled between chunks
            yield finished("cancelled", 0, None, time.perf_counter() - start)
            return
        prefill_s = time.perf_counter() - start

        llm.set_seed(sampling.seed)
        sampler = llm._init_sampler(
            top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p, temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        completion = 0
        unsent = 0  # tokens whose bytes wait in the decoder for the rest of a UTF-8 sequence
        first_token_at: float | None = None
        reason = "length"
        try:
            while completion < sampling.max_tokens:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if llm.n_tokens >= self.n_ctx:
                    break
                token = int(sampler.sample(llm._ctx, -1))
                completion += 1
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                # Every sampled token enters the cache, stop tokens included, so the next turn reuses all of it.
                self._eval([token])
                if token in stop_tokens or (not ignore_eog and self._is_eog(token)):
                    reason = "stop"
                    break
                unsent += 1
                text = decoder.decode(self._piece_bytes([token]))
                if text:
                    yield TextChunk(text=text, n_tokens=unsent)
                    unsent = 0
        finally:
            sampler.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            yield TextChunk(text=tail, n_tokens=unsent)
        yield finished(reason, completion, first_token_at, prefill_s)

    def save_state(self, path: Path) -> None:
        llm = self._llm
        tokens = self.cached_tokens
        partial = path.with_name(path.name + ".partial")
        ok = self._llama_cpp.llama_state_save_file(
            llm._ctx.ctx, os.fsencode(partial), (self._llama_cpp.llama_token * len(tokens))(*tokens), len(tokens)
        )
        if not ok:
            partial.unlink(missing_ok=True)
            raise EngineError(str(path), "llama.cpp could not write the session state")
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)

    def load_state(self, path: Path) -> int:
        llm = self._llm
        tokens = (self._llama_cpp.llama_token * self.n_ctx)()
        count = ctypes.c_size_t(0)
        if not path.is_file():
            raise EngineError(str(path), "no such session state file")
        if not self._llama_cpp.llama_state_load_file(
            llm._ctx.ctx, os.fsencode(path), tokens, self.n_ctx, ctypes.byref(count)
        ):
            llm.n_tokens = 0
            llm._ctx.kv_cache_clear()
            raise EngineError(str(path), "not a session state for this model and context size")
        n = count.value
        llm.input_ids[:n] = tokens[:n]
        llm.n_tokens = n
        return n

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
