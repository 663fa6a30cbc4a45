"""The core of `lcrun bench`: prompt processing (pp) and generation (tg) speed with the KV cache already holding
`depth` tokens, as llama-bench's `-d` measures it.

For each depth D (smallest first): the cache is filled with D tokens (untimed), then each repetition times one
request through lcrun.generation's decode loop — the one every front end uses — of those D tokens plus `pp` new ones,
with greedy tokens after them (`ignore_eos`, so the model cannot stop early) and short batches not padded
(`pad_short_batches=False`: llama.cpp as it is, like llama-bench). The loop reuses the D cached tokens, so the prefill
evaluates exactly the `pp` new ones; every repetition checks that it did (`Finished.reused_tokens == D`).

The loop never decodes a request's last sampled token (nothing would read its logits), so tg generation is a request
for tg + 1 tokens: after the first, sampled from the prompt's logits, come tg decodes of one token and tg samples,
llama-bench's tg. Timing comes from the event stream, not from `Finished`'s rates: pp is from the call to the last
`PrefillProgress` (the prefix match and the `pp` tokens' evaluation, the same span as `Finished.prefill_tokens_per_s`);
tg is from there to `Finished` (sampler set-up, then those tg + 1 samples and tg decodes) and counts tg tokens.
No raw decode path is needed.

The tokens are the model's own: pseudo-random lowercase words (seeded) tokenized without BOS and without parsing
special tokens, so no control token is among them. Speed does not depend on which ids they are.

Pure: the engine is a parameter (lcrun.engine.protocol.EngineProtocol); no llama_cpp, no rich.
"""
from __future__ import annotations

import random
import statistics
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine.protocol import GREEDY
from .errors import LcrunError
from .generation.drive import generate, prefill
from .generation.records import Finished, GenerationParams, PrefillProgress, Request

if TYPE_CHECKING:
    from .launch.decide import Launch

CTX_STEP = 256                  # a context chosen for the depths is rounded up to this
DEPTH_LADDER_BASE = 1024        # default depths: 0 and 1k, 4k, 16k, 64k, … (×4) that fit
WARMUP_PROMPT = 128             # tokens of the untimed warm-up (enough for llama.cpp's batched matmul path)
TOKEN_SOURCE = "pseudo-random lowercase words (seed {seed}) tokenized without BOS or special tokens"
_PROMPT_OFFSETS = 64            # where each repetition's prompt may start, so it never matches the cache

Progress = Callable[[str, int, int], None]   # (what, done, total)


class BenchError(LcrunError):
    """Bad bench parameters (a depth that does not fit, a count out of range) or a measurement that went wrong."""


@dataclass(frozen=True)
class Repetition:
    pp_tokens: int
    pp_s: float
    tg_tokens: int
    tg_s: float
    reused_tokens: int             # what the engine found in the KV cache: the depth

    @property
    def pp_tokens_per_s(self) -> float:
        return self.pp_tokens / self.pp_s if self.pp_s > 0 else 0.0

    @property
    def tg_tokens_per_s(self) -> float | None:
        return self.tg_tokens / self.tg_s if self.tg_tokens and self.tg_s > 0 else None


@dataclass(frozen=True)
class Rate:
    """Tokens/s over the repetitions, as llama-bench reports it: mean and sample standard deviation of the rates."""
    mean: float
    stddev: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Rate:
        values = list(samples)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)


@dataclass(frozen=True)
class DepthResult:
    depth: int
    pp: int
    tg: int
    repetitions: list[Repetition]

    @property
    def pp_rate(self) -> Rate:
        return Rate.of([r.pp_tokens_per_s for r in self.repetitions])

    @property
    def tg_rate(self) -> Rate | None:
        rates = [r.tg_tokens_per_s for r in self.repetitions]
        return Rate.of([r for r in rates if r is not None]) if None not in rates else None

    def to_dict(self) -> dict[str, Any]:
        tg = self.tg_rate
        return {"depth": self.depth, "pp": self.pp, "tg": self.tg,
                "pp_tokens_per_s": asdict(self.pp_rate), "tg_tokens_per_s": asdict(tg) if tg else None,
                "repetitions": [asdict(r) for r in self.repetitions]}


@dataclass(frozen=True)
class BenchSetup:
    """What `lcrun bench` will run: the depths and the engine's settings, decided before the model loads."""
    depths: list[int]
    launch: Launch


@dataclass
class BenchReport:
    model: str
    path: Path
    file_type: str | None
    n_layer: int
    ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_gpu_layers: int
    n_threads: int | None          # None: llama-cpp-python's default
    n_batch: int
    n_ubatch: int
    pp: int
    tg: int
    repetitions: int
    token_source: str
    why: str
    results: list[DepthResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "path": str(self.path), "file_type": self.file_type, "n_layer": self.n_layer,
            "plan": {"ctx": self.ctx, "type_k": self.type_k, "type_v": self.type_v, "flash_attn": self.flash_attn,
                     "n_gpu_layers": self.n_gpu_layers, "n_threads": self.n_threads, "n_batch": self.n_batch,
                     "n_ubatch": self.n_ubatch, "why": self.why},
            "pp": self.pp, "tg": self.tg, "repetitions": self.repetitions, "token_source": self.token_source,
            "results": [r.to_dict() for r in self.results], "warnings": self.warnings,
        }


# -- before loading: depths and context ----------------------------------------------------------------------------
def tokens_needed(depth: int, pp: int, tg: int) -> int:
    # tg decoded tokens and the one sampled after them, which the loop never decodes; with tg 0 the prompt alone
    # must still leave a cell free (the engine refuses a prompt that fills the context)
    return depth + pp + tg + 1


def default_depths(max_ctx: int, pp: int, tg: int) -> list[int]:
    """0 and every 1k·4^i (1k, 4k, 16k, 64k, …) whose pp and tg still fit `max_ctx`."""
    depths = [0]
    depth = DEPTH_LADDER_BASE
    while tokens_needed(depth, pp, tg) <= max_ctx:
        depths.append(depth)
        depth *= 4
    return depths


def context_for(depths: Sequence[int], pp: int, tg: int) -> int:
    need = tokens_needed(max(depths), pp, tg)
    return -(-need // CTX_STEP) * CTX_STEP


def check_counts(depths: Sequence[int], pp: int, tg: int, repetitions: int) -> None:
    if pp < 1:
        raise BenchError("--pp", f"{pp} must be at least 1 (the prompt tokens to time)")
    if tg < 0:
        raise BenchError("--tg", f"{tg} must be 0 (no generation) or more")
    if repetitions < 1:
        raise BenchError("--repetitions", f"{repetitions} must be at least 1")
    negative = [d for d in depths if d < 0]
    if negative:
        raise BenchError("--depth", f"{negative[0]} is negative (a depth is the tokens already in the KV cache)")


def _refuse_misfit(depths: Sequence[int], pp: int, tg: int, n_ctx: int, limit: Callable[[int], str]) -> None:
    """Raise when the deepest measurement does not fit `n_ctx`; `limit(context)` says why and what to do, given
    the context it needs rounded up."""
    depth = max(depths)
    need = tokens_needed(depth, pp, tg)
    if need > n_ctx:
        raise BenchError(f"--depth {depth:,}", f"needs a {need:,}-token context ({depth:,} cached + {pp:,} prompt "
                                               f"+ {tg:,} generated + 1), {limit(context_for([depth], pp, tg))}")


def set_up_bench(launch: Launch, depths: Sequence[int], *, pp: int, tg: int, repetitions: int) -> BenchSetup:
    """The depths (the default ladder when none are given) and the launch to run them with, from the launch decided
    for the options. Without --ctx the context is the smallest that holds the deepest measurement, since a smaller
    context allocates less and runs as fast."""
    from .launch.decide import no_larger_than_needed

    check_counts(depths, pp, tg, repetitions)
    if launch.options.ctx is not None:
        chosen = sorted(set(depths)) or default_depths(launch.choice.estimate.ctx, pp, tg)
        _refuse_misfit(chosen, pp, tg, launch.choice.estimate.ctx, lambda ctx: (
            f"more than --ctx {launch.choice.estimate.ctx:,}; lower the depth or raise --ctx to {ctx}"))
        return BenchSetup(chosen, launch)
    widest = launch
    largest = widest.choice.estimate.ctx
    chosen = sorted(set(depths)) or default_depths(largest, pp, tg)
    if largest >= widest.spec.n_ctx_train:
        _refuse_misfit(chosen, pp, tg, largest, lambda ctx: (
            f"above the model's maximum of {largest:,}; lower the depth, or pass --ctx {ctx} to go past it"))
    else:
        _refuse_misfit(chosen, pp, tg, largest, lambda ctx: (
            f"but {largest:,} is the most that fits in memory here; lower the depth or use a smaller --kv-type"))
    return BenchSetup(chosen, no_larger_than_needed(widest, context_for(chosen, pp, tg)))


# -- with a loaded engine ------------------------------------------------------------------------------------------
def bench_tokens(engine: Any, count: int, *, seed: int = 0) -> list[int]:
    """`count` ids of the engine's vocabulary, none of them special, the same for the same model and seed."""
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < count:
        words = (" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(4096)))
        tokens += engine.tokenize(" " + words, special=False, add_bos=False)
    return tokens[:count]


def fill_cache(engine: Any, context: list[int], *, batch: int, progress: Progress | None = None) -> None:
    """Bring the cache to exactly `context` (evaluating only what is not cached already)."""
    if not context:
        return
    for event in prefill(engine, context, chunk=batch):
        if progress is not None and isinstance(event, PrefillProgress):
            progress(f"filling the cache to {len(context):,} tokens", event.done, event.total)


def measure(engine: Any, context: list[int], prompt: list[int], tg: int, *, batch: int,
            clock: Callable[[], float] = time.perf_counter) -> Repetition:
    """One repetition: the prefill of `prompt` after the cached `context`, then `tg` greedy tokens decoded."""
    reply = GenerationParams(GREEDY, max_tokens=tg + 1 if tg else 0, ignore_eos=True)
    events = generate(engine, Request(context + prompt, reply), prefill_chunk=batch,
                      pad_short_batches=False)  # llama.cpp as it is, like llama-bench
    start = clock()
    prefilled: float | None = None
    finished: Finished | None = None
    for event in events:
        if isinstance(event, PrefillProgress) and event.done == event.total:
            prefilled = clock()
        elif isinstance(event, Finished):
            finished = event
    end = clock()
    if finished is None or prefilled is None or finished.reason == "cancelled":
        raise BenchError("bench", "the engine stopped before the measurement finished")
    if finished.reused_tokens != len(context):
        raise BenchError(f"depth {len(context):,}", f"the engine reused {finished.reused_tokens:,} cached tokens "
                                                    f"instead of {len(context):,}; the measurement would be wrong")
    decoded = max(finished.completion_tokens - 1, 0)
    if decoded != tg:
        raise BenchError(f"depth {len(context):,}", f"generated {decoded} of {tg} tokens (the context filled up)")
    return Repetition(pp_tokens=len(prompt), pp_s=prefilled - start, tg_tokens=tg, tg_s=end - prefilled,
                      reused_tokens=finished.reused_tokens)


def prompt_after(engine: Any, stream: list[int], depth: int, start: int, pp: int) -> list[int]:
    """`pp` tokens from `stream[start:]` whose first differs from the one cached at position `depth`, so the engine
    keeps exactly `depth` tokens of the cache whatever the previous repetition left there."""
    cached = engine.cached_tokens
    after = cached[depth] if len(cached) > depth else None
    for offset in range(start, start + _PROMPT_OFFSETS):
        if stream[offset] != after:
            return stream[offset : offset + pp]
    raise BenchError("bench", "the token stream repeats one token; cannot start a prompt that misses the cache")


def run_bench(engine: Any, depths: Sequence[int], *, pp: int, tg: int, repetitions: int, seed: int = 0,
              progress: Progress | None = None, clock: Callable[[], float] = time.perf_counter) -> list[DepthResult]:
    """Measure each depth (smallest first, so each fill extends the previous one) after one untimed warm-up."""
    depth_list = sorted(set(depths))
    if not depth_list:
        raise BenchError("--depth", "no depth to measure")
    check_counts(depth_list, pp, tg, repetitions)
    _refuse_misfit(depth_list, pp, tg, engine.n_ctx, lambda _: f"more than the engine's {engine.n_ctx:,}")
    batch = engine.config.n_batch
    base = max(depth_list)
    stream = bench_tokens(engine, base + _PROMPT_OFFSETS + pp, seed=seed)
    if progress is not None:
        progress("warming up", 0, 1)
    measure(engine, [], prompt_after(engine, stream, 0, base, min(pp, WARMUP_PROMPT)), min(tg, 2), batch=batch,
            clock=clock)
    if progress is not None:
        progress("warming up", 1, 1)
    results = []
    for depth in depth_list:
        context = stream[:depth]
        fill_cache(engine, context, batch=batch, progress=progress)
        runs = []
        for i in range(repetitions):
            if progress is not None:
                progress(f"depth {depth:,}: pp{pp} + tg{tg}", i, repetitions)
            runs.append(measure(engine, context, prompt_after(engine, stream, depth, base, pp), tg, batch=batch,
                                clock=clock))
        if progress is not None:
            progress(f"depth {depth:,}: pp{pp} + tg{tg}", repetitions, repetitions)
        results.append(DepthResult(depth, pp, tg, runs))
    return results


def bench_report(setup: BenchSetup, results: list[DepthResult], *, pp: int, tg: int, repetitions: int,
                 seed: int = 0) -> BenchReport:
    launch = setup.launch
    p, cfg, spec = launch.choice.estimate, launch.config, launch.spec
    return BenchReport(
        model=launch.model_path.name, path=launch.model_path, file_type=spec.file_type, n_layer=spec.n_layer,
        ctx=cfg.n_ctx, type_k=p.type_k, type_v=p.type_v, flash_attn=p.flash_attn, n_gpu_layers=p.n_gpu_layers,
        n_threads=cfg.n_threads, n_batch=cfg.n_batch, n_ubatch=cfg.n_ubatch, pp=pp, tg=tg, repetitions=repetitions,
        token_source=TOKEN_SOURCE.format(seed=seed), why=launch.choice.why, results=results,
        warnings=list(launch.warnings),
    )
