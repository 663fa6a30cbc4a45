"""What an engine is, for everything that drives one: its configuration, the sampler settings, the step API's records
and its interface as a `typing.Protocol`.

An engine holds `n_seq` sequences in one llama.cpp context, each with its cached tokens (reused for the longest
common prefix of the next prompt) and its sampler chain, prefixes copied between them, and a step API that decodes
several sequences' tokens in one `llama_decode` and samples each from its own logits. It generates nothing by
itself: `lcrun.generation`'s one decode loop drives the step API for chat, niah, bench and serve.
`lcrun.engine.runtime.Engine` is the llama.cpp engine; `tests/fixtures/fake_engine.py` the fake the UI and server
tests use; `tests/test_engine_contract.py` holds both to this protocol. No llama_cpp here: importing it is cheap.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

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
    """One sequence's sampler chain. The defaults are the one source of lcrun's sampling defaults — `lcrun chat`'s
    options and serve's unset request fields take theirs from here — and they are llama.cpp's own
    (common_params_sampling, which llama-server and llama-cli use and llama-cpp-python's `Llama` repeats): temperature
    0.8, top-k 40, top-p 0.95, min-p 0.05, no penalties."""
    temperature: float = 0.8         # 0: greedy; below 0: sample from the raw distribution
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    # OpenAI's (and llama.cpp's) penalties over the last REPEAT_LAST_N tokens: minus frequency × count, minus presence
    # once a token appeared
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


GREEDY = Sampling(temperature=0.0)   # niah, bench, parity checks: the most likely token every time


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (llama.cpp's grammars/README.md) that a reply must follow: llama.cpp's grammar sampler joins
    the sequence's chain. Strict (`lazy` off), it holds from the first token. Lazy, it holds from the token that
    starts a trigger: one of `trigger_tokens` (a token such as <tool_call>, whose text the grammar spells first), or,
    while the reply is only whitespace, a token whose text (its whitespace dropped) starts with one of
    `trigger_prefixes` or is the start of one (a JSON call opening with `{`). Before that, nothing is constrained."""
    gbnf: str
    root: str = "root"
    lazy: bool = False
    trigger_tokens: tuple[int, ...] = ()
    trigger_prefixes: tuple[str, ...] = ()


class Feed(NamedTuple):
    """Tokens to append to one sequence in a `decode` step. With `logits`, the last one's logits are kept for
    `sample(seq)`; a prefill chunk that is not a prompt's last goes without. (A NamedTuple: one is made per generated
    token, at a quarter of a frozen dataclass's cost.)"""
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
    """Sequences 0 … n_seq-1 in one context; the single-conversation methods (`cached_tokens`, `save_state`,
    `load_state`) default to sequence 0. The step API, as the decode loop uses it:

        engine.set_sampler(s, sampling, grammar)              # when a request starts on sequence s
        plan = engine.plan_prompt(s, prompt)                  # reuse what s holds; the rest in chunks
        engine.decode([Feed(a, [last_a]), Feed(b, [last_b]), Feed(s, plan.chunks[i], logits=i == last)])
        next_a, next_b = engine.sample(a), engine.sample(b)   # each from its own logits, with its own sampler

    A decode replaces the logits of the one before: sample (and read `logits`) in between. Several choices of one
    prompt: `seq_copy(s, t)` then `copy_logits(s, t)`, and t samples its own first token from s's logits.
    """

    n_ctx: int
    n_ctx_train: int
    n_seq: int
    n_ctx_seq: int                  # tokens one sequence can hold
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
    def token_bytes(self, token: int) -> bytes: ...
    def special_tokens(self) -> dict[str, int]: ...
    def is_eog(self, token: int) -> bool: ...

    def seq_tokens(self, seq: int) -> list[int]: ...
    def seq_len(self, seq: int) -> int: ...
    def common_prefix(self, seq: int, tokens: Sequence[int]) -> int: ...
    def seq_truncate(self, seq: int, keep: int) -> int: ...
    def seq_clear(self, seq: int) -> None: ...
    def seq_copy(self, src: int, dst: int, n: int | None = None) -> None: ...
    def kv_cells_used(self) -> int: ...

    def plan_prompt(self, seq: int, prompt_tokens: list[int], *, chunk: int = 512, sample: bool = True,
                    pad_short_batches: bool = True) -> PromptPlan: ...
    def set_sampler(self, seq: int, sampling: Sampling, grammar: Grammar | None = None) -> None: ...
    def check_grammar(self, grammar: Grammar) -> None:
        """Raise GrammarError (naming the problem) when llama.cpp cannot compile `grammar`."""
    def decode(self, feeds: Sequence[Feed]) -> None: ...
    def sample(self, seq: int) -> int: ...
    def logits(self, seq: int) -> np.ndarray: ...
    def copy_logits(self, src: int, dst: int) -> None:
        """Let `sample(dst)` (and `logits(dst)`) read the logits `src` got in the last decode."""

    def save_state(self, path: Path, *, seq: int = 0) -> None: ...
    def load_state(self, path: Path, *, seq: int = 0) -> int: ...
    def snapshot(self, seq: int) -> SequenceState: ...
    def restore(self, state: SequenceState, seq: int) -> int: ...

    def close(self) -> None: ...
    def __enter__(self) -> EngineProtocol: ...
    def __exit__(self, *exc: object) -> None: ...
