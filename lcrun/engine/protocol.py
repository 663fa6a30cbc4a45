"""What an engine is, for everything that drives one: the configuration, the typed records it streams, and its
interface as `typing.Protocol`s.

`EngineProtocol` is what chat, niah and bench use: one conversation whose KV cache the engine keeps between calls.
The fake engine of the UI tests implements it. `SequenceEngineProtocol` adds what a server needs on top: several
sequences in one llama.cpp context, each with its cached tokens and its sampler, prefixes copied between them, and a
step API that decodes the next token of every generating sequence (and a chunk of a new prompt) in one
`llama_decode`. `lcrun.engine.runtime.Engine` implements both. No llama_cpp here: importing this module is cheap.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    n_ctx: int                       # the whole context: with n_seq sequences each holds about n_ctx / n_seq
    n_gpu_layers: int = 0            # -1: all
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    n_threads: int | None = None     # None: half the CPUs (llama-cpp-python's default)
    n_batch: int = 512
    n_ubatch: int = 512
    seed: int = 0                    # unused by sampling (Sampling.seed is); kept so configs stay comparable
    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None
    n_seq: int = 1                   # sequences sharing the context (a server's parallel slots)
    # one KV buffer for all sequences: a prefix copied between sequences shares its cells instead of being copied,
    # and a sequence may use the whole context; attention then spans every sequence's cells (llama.cpp's default
    # is separate buffers, one per sequence)
    kv_unified: bool = False
    n_threads_batch: int | None = None   # None: every CPU (llama-cpp-python's default)
    # ggml backend devices to offload to, by name ("CUDA0", "RPC0[host:port]" for an RPC worker's first device …):
    # None lets llama.cpp use every device it finds, () none (CPU only)
    devices: tuple[str, ...] | None = None
    # llama_model_params.tensor_split: the offloaded layers' shares per device of `devices` (layer counts work);
    # None splits by free memory, as llama.cpp does
    tensor_split: tuple[float, ...] | None = None
    # llama.cpp's weight repacking into its extra CPU buffer types (llama_model_params.use_extra_bufts; llama.cpp's
    # --no-repack turns it off). None: on, unless the build uses AMX, whose matrix multiplication crashes on load or
    # at the first decode (ggml-org/llama.cpp#20824; seen on every quantized file tried on a Sapphire Rapids VM)
    repack: bool | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    # OpenAI's (and llama.cpp's) penalties over the last REPEAT_LAST_N tokens: minus frequency × count, minus presence
    # once a token appeared
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


# What a conversation samples with unless the user says otherwise (`lcrun chat` and its options take their defaults
# from here). `Sampling()` itself is greedy: the engine's default for niah, bench and tests.
CHAT_SAMPLING = Sampling(temperature=0.7, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0, seed=0)


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


GenerateEvent = PrefillProgress | TextChunk | Finished


@dataclass(frozen=True)
class Feed:
    """Tokens to append to one sequence in a `decode` step. With `logits`, the last one's logits are kept for
    `sample(seq)`; a prefill chunk that is not a prompt's last goes without."""
    seq: int
    tokens: Sequence[int]
    logits: bool = True


@dataclass(frozen=True)
class PromptPlan:
    """What `plan_prompt` kept of a sequence's cache for a prompt, and the rest of the prompt in decode chunks."""
    reused: int
    chunks: list[list[int]]

    @property
    def n_tokens(self) -> int:
        return sum(map(len, self.chunks))


@dataclass(frozen=True)
class SequenceState:
    """One sequence's KV cache in memory (llama_state_seq_get_data) and the tokens it holds."""
    tokens: tuple[int, ...]
    data: bytes


@runtime_checkable
class EngineProtocol(Protocol):
    """A llama.cpp session for one conversation: the KV cache is kept between calls and reused for the longest
    common prefix of what it holds and the next prompt."""

    n_ctx: int
    n_ctx_train: int
    metadata: dict[str, str]        # every GGUF key/value, as strings

    @property
    def config(self) -> EngineConfig: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def cached_tokens(self) -> list[int]: ...
    @property
    def add_bos(self) -> bool:
        """Whether prompts start with BOS (llama.cpp adds it when tokenizing with add_special)."""

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def token_text(self, token: int) -> str: ...
    def special_tokens(self) -> dict[str, int]: ...

    def prefill(self, tokens: list[int], *, cancel: threading.Event | None = None,
                chunk: int = 512) -> Iterator[PrefillProgress]: ...
    def generate(self, prompt_tokens: list[int], sampling: Sampling, *, stop_tokens: set[int] | None = None,
                 cancel: threading.Event | None = None, prefill_chunk: int = 512, ignore_eog: bool = False,
                 pad_short_batches: bool = True) -> Iterator[GenerateEvent]: ...

    def save_state(self, path: Path) -> None: ...
    def load_state(self, path: Path) -> int: ...

    def close(self) -> None: ...
    def __enter__(self) -> EngineProtocol: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class SequenceEngineProtocol(EngineProtocol, Protocol):
    """Several sequences (0 … n_seq-1) in one context. The single-conversation methods take `seq` (default 0);
    `decode` + `sample` are the step API of continuous batching:

        engine.set_sampler(s, sampling)                       # when a request starts on sequence s
        plan = engine.plan_prompt(s, prompt)                  # reuse what s holds; the rest in chunks
        engine.decode([Feed(a, [last_a]), Feed(b, [last_b]), Feed(s, plan.chunks[i], logits=i == last)])
        next_a, next_b = engine.sample(a), engine.sample(b)   # each from its own logits, with its own sampler

    A decode replaces the logits of the one before: sample (and read `logits`) in between.
    """

    n_seq: int
    n_ctx_seq: int                  # tokens one sequence can hold

    def prefill(self, tokens: list[int], *, seq: int = 0, cancel: threading.Event | None = None,
                chunk: int = 512) -> Iterator[PrefillProgress]: ...
    def generate(self, prompt_tokens: list[int], sampling: Sampling, *, seq: int = 0,
                 stop_tokens: set[int] | None = None, cancel: threading.Event | None = None,
                 prefill_chunk: int = 512, ignore_eog: bool = False,
                 pad_short_batches: bool = True) -> Iterator[GenerateEvent]: ...
    def save_state(self, path: Path, *, seq: int = 0) -> None: ...
    def load_state(self, path: Path, *, seq: int = 0) -> int: ...

    def token_bytes(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...

    def plan_prompt(self, seq: int, prompt_tokens: list[int], *, chunk: int = 512, sample: bool = True,
                    pad_short_batches: bool = True) -> PromptPlan: ...
    def seq_tokens(self, seq: int) -> list[int]: ...
    def seq_len(self, seq: int) -> int: ...
    def common_prefix(self, seq: int, tokens: Sequence[int]) -> int: ...
    def seq_truncate(self, seq: int, keep: int) -> int: ...
    def seq_clear(self, seq: int) -> None: ...
    def seq_copy(self, src: int, dst: int, n: int | None = None) -> None: ...
    def snapshot(self, seq: int) -> SequenceState: ...
    def restore(self, state: SequenceState, seq: int) -> int: ...
    def kv_cells_used(self) -> int: ...

    def set_sampler(self, seq: int, sampling: Sampling) -> None: ...
    def decode(self, feeds: Sequence[Feed]) -> None: ...
    def sample(self, seq: int) -> int: ...
    def logits(self, seq: int) -> np.ndarray: ...
