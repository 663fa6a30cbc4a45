"""lcrun.engine.runtime against a real tiny Llama GGUF: parity with llama-cpp-python, KV prefix reuse, chunked
prefill with progress and cancellation, limits, session state files and UTF-8-safe streaming."""
from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from lcrun.convert.convert import convert_checkpoint
from lcrun.engine.runtime import Engine, EngineConfig, Finished, PrefillProgress, Sampling, TextChunk
from tests.fixtures.checkpoint_factory import make_llama_checkpoint

N_CTX = 512
GREEDY = Sampling(temperature=0.0, max_tokens=12)
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 日本語 text, numbers 12345 and more words follow here."


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    ck = make_llama_checkpoint(root / "ckpt", hidden=128, layers=2, heads=4, kv_heads=2, ffn=256)
    return convert_checkpoint(ck.path, root / "tiny.gguf", outtype="f16").paths[0]


def make_config(path: Path) -> EngineConfig:
    # flash attention off: with it on, a CPU engine re-evaluates cached tokens to avoid short batches (tested apart,
    # in test_cpu_flash_attention_never_decodes_a_short_batch), and these tests count reused tokens exactly
    return EngineConfig(model_path=path, n_ctx=N_CTX, n_threads=2, n_batch=64, n_ubatch=64, flash_attn=False)


@pytest.fixture
def engine(gguf_path: Path) -> Iterable[Engine]:
    eng = Engine(make_config(gguf_path))
    yield eng
    eng.close()


def run(engine: Engine, prompt: list[int], sampling: Sampling = GREEDY, **kw) -> tuple[list, Finished]:
    events = list(engine.generate(prompt, sampling, **kw))
    assert isinstance(events[-1], Finished)
    assert not any(isinstance(e, Finished) for e in events[:-1])
    return events, events[-1]


def completion_tokens(engine: Engine, prompt: list[int], fin: Finished) -> list[int]:
    """What was generated, read back from the cache (every sampled token is cached)."""
    cached = engine.cached_tokens
    assert cached[: len(prompt)] == prompt
    assert len(cached) == len(prompt) + fin.completion_tokens
    return cached[len(prompt):]


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def test_greedy_matches_llama_cpp_python(engine: Engine, gguf_path: Path) -> None:
    import llama_cpp

    prompt = engine.tokenize(TEXT, add_bos=True)
    events, fin = run(engine, prompt)
    ours = completion_tokens(engine, prompt, fin)

    direct = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=N_CTX, n_threads=2, n_batch=64, n_ubatch=64,
                             flash_attn=False, yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0,
                             verbose=False)
    try:
        theirs = []
        for tok in direct.generate(prompt, temp=0.0, top_k=40, top_p=1.0, min_p=0.05, repeat_penalty=1.0):
            theirs.append(tok)
            if len(theirs) == len(ours):  # a stop token ends ours and is cached: it is the last of both
                break
    finally:
        direct.close()
    assert ours == theirs
    assert fin.prompt_tokens == len(prompt) and fin.reused_tokens == 0
    assert fin.reason in ("stop", "length")


def test_prefix_reuse_evaluates_only_new_tokens(engine: Engine, gguf_path: Path) -> None:
    first = engine.tokenize(TEXT, add_bos=True)
    _, fin1 = run(engine, first)
    answer = completion_tokens(engine, first, fin1)
    second = first + answer + engine.tokenize(" And then the story continues.")

    events, fin2 = run(engine, second)
    prefix = len(first) + len(answer)
    assert fin2.reused_tokens == prefix
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert progress[-1].total == len(second) - prefix
    tokens_reused = completion_tokens(engine, second, fin2)

    with Engine(make_config(gguf_path)) as fresh:
        _, fin_fresh = run(fresh, second)
        assert fin_fresh.reused_tokens == 0
        assert completion_tokens(fresh, second, fin_fresh) == tokens_reused


def test_identical_prompt_reevaluates_only_last_token(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    _, fin1 = run(engine, prompt)
    first = completion_tokens(engine, prompt, fin1)
    events, fin2 = run(engine, prompt)
    assert fin2.reused_tokens == len(prompt) - 1
    assert [e for e in events if isinstance(e, PrefillProgress)] == [PrefillProgress(1, 1)]
    assert completion_tokens(engine, prompt, fin2) == first


def test_prefill_progress_covers_prompt_once(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT * 3, add_bos=True)
    events, _ = run(engine, prompt, Sampling(max_tokens=1), prefill_chunk=16)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [p.done for p in progress] == [min(i + 16, len(prompt)) for i in range(0, len(prompt), 16)]
    assert {p.total for p in progress} == {len(prompt)}
    # every progress record comes before any text
    last_progress = max(i for i, e in enumerate(events) if isinstance(e, PrefillProgress))
    assert all(not isinstance(e, TextChunk) for e in events[:last_progress])


def test_cancel_mid_prefill_then_engine_still_works(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT * 3, add_bos=True)
    cancel = threading.Event()
    events = []
    for event in engine.generate(prompt, GREEDY, cancel=cancel, prefill_chunk=16):
        events.append(event)
        if isinstance(event, PrefillProgress) and event.done == 32:
            cancel.set()
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "cancelled" and fin.completion_tokens == 0
    assert not any(isinstance(e, TextChunk) for e in events)
    assert len(engine.cached_tokens) == 32

    _, after = run(engine, prompt)
    assert after.reused_tokens == 32
    cached_answer = completion_tokens(engine, prompt, after)
    _, again = run(engine, prompt)
    assert completion_tokens(engine, prompt, again) == cached_answer


def test_max_tokens_respected(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    events, fin = run(engine, prompt, Sampling(max_tokens=3), stop_tokens=set())
    assert fin.completion_tokens <= 3
    assert sum(e.n_tokens for e in events if isinstance(e, TextChunk)) <= 3
    if fin.reason == "length":
        assert fin.completion_tokens == 3


def test_stop_token_ends_generation(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    _, fin = run(engine, prompt)
    first = completion_tokens(engine, prompt, fin)[0]
    events, stopped = run(engine, prompt, stop_tokens={first})
    assert stopped.reason == "stop" and stopped.completion_tokens == 1
    assert text_of(events) == ""


def test_save_and_load_state_restores_prefix(engine: Engine, gguf_path: Path, tmp_path: Path) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    _, fin = run(engine, prompt)
    saved = engine.cached_tokens
    state = tmp_path / "session.state"
    engine.save_state(state)
    assert state.is_file() and not (tmp_path / "session.state.partial").exists()

    follow_up = saved + engine.tokenize(" Next question?")
    _, expected = run(engine, follow_up)
    expected_tokens = completion_tokens(engine, follow_up, expected)

    with Engine(make_config(gguf_path)) as restored:
        assert restored.load_state(state) == len(saved)
        assert restored.cached_tokens == saved
        _, fin2 = run(restored, follow_up)
        assert fin2.reused_tokens == len(saved)
        assert completion_tokens(restored, follow_up, fin2) == expected_tokens


def test_streamed_text_is_utf8_safe(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    sampling = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=60, seed=7)
    events, fin = run(engine, prompt, sampling)
    generated = completion_tokens(engine, prompt, fin)
    if fin.reason == "stop":
        generated = generated[:-1]
    assert text_of(events) == engine.detokenize(generated)
    assert sum(e.n_tokens for e in events if isinstance(e, TextChunk)) == len(generated)
    assert fin.completion_tokens > 0 and fin.gen_tokens_per_s >= 0 and fin.time_to_first_token_s > 0


def test_detokenize_roundtrip(engine: Engine) -> None:
    assert engine.detokenize(engine.tokenize(TEXT)) == TEXT


def test_cpu_flash_attention_never_decodes_a_short_batch(gguf_path: Path) -> None:
    """A 2-63-token batch takes llama.cpp's slow CPU flash-attention path: a short new suffix is padded with cached
    tokens to 64 and a prefill's short last chunk borrows from the one before. The answers stay the same."""
    from lcrun.engine.runtime import CPU_FA_TILE

    config = EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, n_batch=128, n_ubatch=128, flash_attn=True)
    sizes: list[int] = []
    fa, fresh = Engine(config), Engine(config)
    try:
        original = fa._eval
        fa._eval = lambda seq, tokens, logits: (sizes.append(len(tokens)), original(seq, tokens, logits))[1]  # type: ignore[method-assign]
        base = fa.tokenize(TEXT * 4, add_bos=True)[:150]           # 128 + 22 would end on a short batch
        list(fa.prefill(base))
        assert sizes == [150 - CPU_FA_TILE, CPU_FA_TILE]
        sizes.clear()
        question = base + fa.tokenize(" and a question?")
        assert len(question) - len(base) < CPU_FA_TILE
        _, fin = run(fa, question)
        assert sizes[0] == CPU_FA_TILE and fin.reused_tokens == len(question) - CPU_FA_TILE
        # negative control: evaluated from scratch (no reuse, no padding) the answer is the same
        _, fin_fresh = run(fresh, question)
        assert fin_fresh.reused_tokens == 0
        assert completion_tokens(fresh, question, fin_fresh) == completion_tokens(fa, question, fin)
    finally:
        fa.close()
        fresh.close()

    plain = Engine(EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, n_batch=128, n_ubatch=128,
                                flash_attn=False))
    try:  # without flash attention there is no slow path: nothing is evaluated twice
        list(plain.prefill(base))
        _, fin_plain = run(plain, question)
        assert fin_plain.reused_tokens == len(base)
    finally:
        plain.close()
