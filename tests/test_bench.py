"""`lcrun bench` on a real tiny Llama GGUF: depths really in the KV cache, the timed spans, the default ladder and
context, the table and --json, and one-line refusals before the model loads."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from lcrun.bench import (BenchError, BenchSetup, bench_tokens, context_for, default_depths, fill_cache, measure,
                         run_bench, set_up_bench)
from lcrun.engine.protocol import PromptPlan
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.launch.decide import decide_launch
from lcrun.launch.options import LaunchOptions
from tests.fixtures.cli import invoke as cli_invoke
from tests.fixtures.engines import Engines
from tests.fixtures.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # half the usual tiny model (head size still 32, so a q8_0 KV cache is legal): small enough for the memory tests
    return write_tiny_gguf(tmp_path_factory.mktemp("bench"), hidden=64, heads=2, kv_heads=1, ffn=128)


def bench_setup(path: Path, depths: list[int], *, pp: int = 512, tg: int = 128, **options: Any) -> BenchSetup:
    """What `lcrun bench PATH --depth … [options]` sets up, with one repetition."""
    launch = decide_launch(LaunchOptions(str(path), chat=False, **options))
    return set_up_bench(launch, depths, pp=pp, tg=tg, repetitions=1)


@pytest.fixture(scope="module")
def engine(gguf_path: Path) -> Iterable[Engine]:
    eng = Engine(EngineConfig(model_path=gguf_path, n_ctx=512, n_threads=1, n_batch=64, n_ubatch=64))
    yield eng
    eng.close()


class Counter:
    """A clock that ticks once per reading: spans become counts of readings."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class SpyEngine:
    """The real engine, recording for each request that generates how much of its prompt the KV cache already held."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []   # (prompt tokens already cached, prompt tokens)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def plan_prompt(self, seq: int, prompt: list[int], **kw: Any) -> PromptPlan:
        if kw.get("sample", True):
            self.calls.append((self.inner.common_prefix(seq, prompt), len(prompt)))
        return self.inner.plan_prompt(seq, prompt, **kw)


def test_each_depth_is_measured_with_that_many_tokens_cached(engine: Engine) -> None:
    spy = SpyEngine(engine)
    results = run_bench(spy, [100, 0], pp=40, tg=6, repetitions=2)

    assert [r.depth for r in results] == [0, 100]
    for result in results:
        assert [rep.reused_tokens for rep in result.repetitions] == [result.depth] * 2
        assert all(rep.pp_tokens == 40 and rep.tg_tokens == 6 for rep in result.repetitions)
        assert result.pp_rate.mean > 0 and result.tg_rate is not None and result.tg_rate.mean > 0
        assert len(result.pp_rate.samples) == 2
    # the warm-up, then 2 per depth: each prompt is the depth's tokens, already cached, and 40 that are not
    assert spy.calls[1:] == [(0, 40), (0, 40), (100, 140), (100, 140)]
    stream = bench_tokens(engine, 100)
    assert engine.cached_tokens[:100] == stream
    assert len(engine.cached_tokens) == 100 + 40 + 6


def test_bench_tokens_are_deterministic_and_not_special(engine: Engine) -> None:
    tokens = bench_tokens(engine, 300)
    assert tokens == bench_tokens(engine, 300) and len(tokens) == 300
    assert bench_tokens(engine, 300, seed=1) != tokens
    assert not set(tokens) & set(engine.special_tokens().values())
    assert len(set(tokens)) > 50


def test_timed_spans_are_prefill_then_generation(engine: Engine) -> None:
    stream = bench_tokens(engine, 120)
    fill_cache(engine, stream[:60], batch=64)
    clock = Counter()
    # readings: start, the last prefill step, the end — pp and tg span one tick each whatever the chunking
    rep = measure(engine, stream[:60], stream[61:81], 5, batch=8, clock=clock)
    assert (rep.pp_s, rep.tg_s, rep.tg_tokens, rep.reused_tokens) == (1.0, 1.0, 5, 60)
    assert rep.pp_tokens_per_s == 20.0 and rep.tg_tokens_per_s == 5.0


def test_no_generation_with_tg_zero(engine: Engine) -> None:
    [result] = run_bench(engine, [0], pp=16, tg=0, repetitions=1)
    assert result.tg_rate is None and result.pp_rate.mean > 0


def test_default_depths_and_context() -> None:
    assert default_depths(2048, 512, 128) == [0, 1024]
    assert default_depths(131072, 512, 128) == [0, 1024, 4096, 16384, 65536]
    assert default_depths(1024, 512, 128) == [0]
    assert context_for([0, 4096], 512, 128) == 4864          # 4,736 rounded up to 256
    assert context_for([0], 512, 0) == 768                    # room for one sampled token even without tg


def test_plan_sizes_the_context_to_the_deepest_measurement(gguf_path: Path) -> None:
    plan = bench_setup(gguf_path, [])
    assert plan.depths == [0, 1024]
    assert plan.launch.config.n_ctx == 1792
    forced = bench_setup(gguf_path, [0], ctx=2048, kv_type="q8_0")
    assert forced.launch.config.n_ctx == 2048 and forced.launch.config.type_k == "q8_0"


def invoke(args: list[str]):  # type: ignore[no-untyped-def]
    return cli_invoke("bench", *args)


def test_cli_table(gguf_path: Path) -> None:
    result = invoke([str(gguf_path), "--depth", "0", "--depth", "128", "--pp", "32", "--tg", "4", "-r", "2",
                     "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "tiny.gguf  ·  F16"
    assert lines[1] == ("context 256 · KV f16 · flash attention off · GPU layers 0/3 · threads 1 · batch 2048/512")
    header = next(line for line in lines if "depth" in line)
    assert "pp32 t/s" in header and "tg4 t/s" in header
    rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["0", "128"]
    assert all(" ± " in row for row in rows)
    assert "mean ± stddev of 2 repetition(s)" in result.output


def test_cli_json_has_plan_and_every_repetition(gguf_path: Path) -> None:
    result = invoke([str(gguf_path), "--depth", "64", "--pp", "16", "--tg", "3", "-r", "2", "--kv-type", "q8_0",
                     "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plan"]["type_k"] == report["plan"]["type_v"] == "q8_0"
    assert report["plan"]["ctx"] == 256 and report["plan"]["flash_attn"] is True
    assert report["file_type"] == "F16" and report["pp"] == 16 and report["tg"] == 3
    assert "pseudo-random" in report["token_source"]
    [depth] = report["results"]
    assert depth["depth"] == 64
    assert [r["reused_tokens"] for r in depth["repetitions"]] == [64, 64]
    assert depth["pp_tokens_per_s"]["mean"] > 0 and depth["tg_tokens_per_s"]["mean"] > 0
    assert len(depth["tg_tokens_per_s"]["samples"]) == 2


@pytest.fixture
def no_engine(engines: Engines) -> None:
    engines.refuse("the model was loaded before the input was checked")


@pytest.mark.parametrize("args, subject, fix", [
    (["--depth", "4k"], "--depth 4,096", "above the model's maximum of 2,048; lower the depth, or pass --ctx 4864"),
    (["--depth", "1k", "--ctx", "1k"], "--depth 1,024",
     "more than --ctx 1,024; lower the depth or raise --ctx to 1792"),
    (["--pp", "0"], "--pp", "0 must be at least 1"),
    (["--tg", "-1"], "--tg", "must be 0 (no generation) or more"),
    (["-r", "0"], "--repetitions", "must be at least 1"),
])
def test_bad_input_is_one_line_before_loading(gguf_path: Path, no_engine: None, args: list[str], subject: str,
                                              fix: str) -> None:
    result = cli_invoke("bench", str(gguf_path), *args)
    assert result.exit_code == 1 and result.stdout == ""
    message = result.stderr.strip()  # one line, through lcrun's real entry point
    assert "\n" not in message and message.startswith(f"error: {subject}: ") and fix in message


def test_depth_that_does_not_fit_in_memory_names_the_kv_type(gguf_path: Path) -> None:
    with pytest.raises(BenchError, match=r"most that fits in memory here; lower the depth or use a smaller --kv-type"):
        bench_setup(gguf_path, [1024], ram=3 << 20, pp=256, tg=64)


def test_unparsable_depth_is_a_usage_error(gguf_path: Path, no_engine: None) -> None:
    result = cli_invoke("bench", str(gguf_path), "--depth", "lots")
    assert result.exit_code == 2
    assert "'lots' is not a token count like 0, 4096 or 4k" in result.stderr


def test_bad_counts_are_refused_before_a_download() -> None:
    result = cli_invoke("bench", "someone/some-model-GGUF:Q4_K_M", "--pp", "0")
    assert result.exit_code == 1 and result.stderr.startswith("error: --pp: ")
