"""Several sequences in one llama.cpp context, on a real tiny Llama GGUF: what a server's slots need from the engine —
batched decoding that answers exactly as each sequence alone, a prefix copied between sequences and reused, a sampler
per sequence, per-sequence state files and snapshots, cancellation of one sequence, and the KV cells in use."""
from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest

from lcrun.engine.protocol import GREEDY, Feed, Sampling
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.errors import EngineError
from lcrun.generation.drive import generate, prefill
from lcrun.generation.records import Finished, GenerationParams, Request, TextChunk

SIXTEEN = GenerationParams(GREEDY, max_tokens=16)
TEXT_A = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 日本語 text, numbers 12345 and more words follow here."
TEXT_B = "Another prompt, quite different: numbers 999 and café, then a long tail of plain words."


@pytest.fixture(scope="module")
def gguf_path(tiny_gguf: Path) -> Path:
    return tiny_gguf


def config(path: Path, *, n_ctx: int = 1024, n_seq: int = 2, unified: bool = False,
           flash_attn: bool = False) -> EngineConfig:
    return EngineConfig(model_path=path, n_ctx=n_ctx, n_threads=2, n_batch=256, n_ubatch=256, flash_attn=flash_attn,
                        n_seq=n_seq, kv_unified=unified)


@pytest.fixture(params=[False, True], ids=["split-kv", "unified-kv"])
def engine(request: pytest.FixtureRequest, gguf_path: Path) -> Iterable[Engine]:
    eng = Engine(config(gguf_path, unified=request.param))
    yield eng
    eng.close()


def reply(engine: Engine, prompt: list[int], seq: int, sampling: Sampling = GREEDY, max_tokens: int = 16,
          **kw) -> list[int]:
    params = GenerationParams(sampling, max_tokens=max_tokens, ignore_eos=True)
    events = list(generate(engine, Request(prompt, params), seq=seq, pad_short_batches=False, **kw))
    assert isinstance(events[-1], Finished)
    assert engine.seq_tokens(seq)[len(prompt):] == list(events[-1].tokens[:-1])
    return list(events[-1].tokens)


def ask(engine: Engine, prompt: list[int], seq: int = 0, params: GenerationParams = SIXTEEN, **kw) -> Finished:
    events = list(generate(engine, Request(prompt, params), seq=seq, **kw))
    assert isinstance(events[-1], Finished)
    return events[-1]


def batched(engine: Engine, prompts: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    """Continuous batching as a server does it: every prompt in one decode, then one decode per step holding the
    sampled token of every sequence."""
    engine.decode([Feed(seq, prompt) for seq, prompt in prompts.items()])
    out: dict[int, list[int]] = {seq: [] for seq in prompts}
    for _ in range(steps):
        for seq in prompts:
            out[seq].append(engine.sample(seq))
        engine.decode([Feed(seq, tokens[-1:]) for seq, tokens in out.items()])
    return out


def test_sizes_follow_llama_cpp(gguf_path: Path) -> None:
    with Engine(config(gguf_path, n_ctx=1024, n_seq=2)) as split, \
            Engine(config(gguf_path, n_ctx=1024, n_seq=2, unified=True)) as unified:
        assert (split.n_ctx, split.n_ctx_seq, split.n_seq) == (1024, 512, 2)      # one buffer per sequence
        assert (unified.n_ctx, unified.n_ctx_seq, unified.n_seq) == (1024, 1024, 2)  # one buffer for all
    with pytest.raises(EngineError, match="0 sequences"):
        Engine(config(gguf_path, n_seq=0))


def test_two_sequences_in_one_batch_answer_as_each_alone(engine: Engine) -> None:
    a, b = engine.tokenize(TEXT_A, add_bos=True), engine.tokenize(TEXT_B, add_bos=True)
    alone = {0: reply(engine, a, 0), 1: reply(engine, b, 1)}
    assert alone[0] != alone[1]  # the comparison below could not confuse the two
    engine.seq_clear(0)
    engine.seq_clear(1)
    for seq in (0, 1):
        engine.set_sampler(seq, GREEDY)
    together = batched(engine, {0: a, 1: b}, 16)
    assert together == alone
    assert engine.seq_tokens(0) == a + alone[0] and engine.seq_tokens(1) == b + alone[1]  # the last one decoded too


def test_a_prompt_chunk_rides_along_with_generating_sequences(gguf_path: Path) -> None:
    """Sequence 1 prefills in chunks inside the steps that generate sequence 0."""
    with Engine(config(gguf_path)) as eng:
        a, b = eng.tokenize(TEXT_A, add_bos=True), eng.tokenize(TEXT_B * 2, add_bos=True)
        alone = {0: reply(eng, a, 0), 1: reply(eng, b, 1)}
        eng.seq_clear(0)
        eng.seq_clear(1)
        eng.set_sampler(0, GREEDY)
        eng.set_sampler(1, GREEDY)
        eng.decode([Feed(0, a)])
        got: dict[int, list[int]] = {0: [], 1: []}
        chunks = [b[i : i + 16] for i in range(0, len(b), 16)]
        for _ in range(40):
            feeds = []
            if len(got[0]) < 16:
                got[0].append(eng.sample(0))
                feeds.append(Feed(0, got[0][-1:]))
            if chunks:
                chunk = chunks.pop(0)
                feeds.append(Feed(1, chunk, logits=not chunks))
            elif len(got[1]) < 16:
                got[1].append(eng.sample(1))
                feeds.append(Feed(1, got[1][-1:]))
            if feeds:
                eng.decode(feeds)
        assert got == alone


def test_prefix_copied_to_another_sequence_is_reused(engine: Engine, gguf_path: Path) -> None:
    document = engine.tokenize(TEXT_A * 3, add_bos=True)
    list(prefill(engine, document, seq=0))
    question = document + engine.tokenize(" What comes next?")
    engine.seq_copy(0, 1, len(document))
    assert engine.seq_tokens(1) == document
    fin = ask(engine, question, seq=1)
    assert fin.reused_tokens == len(document)
    assert engine.seq_tokens(0) == document  # the source is untouched
    with Engine(config(gguf_path, n_seq=1)) as fresh:  # negative control: nothing to reuse, the same answer
        alone = ask(fresh, question)
        assert alone.reused_tokens == 0
        assert alone.tokens == fin.tokens


def test_a_part_of_a_sequence_can_be_copied(engine: Engine) -> None:
    tokens = engine.tokenize(TEXT_A, add_bos=True)
    list(prefill(engine, tokens, seq=0))
    engine.seq_copy(0, 1, 10)
    assert engine.seq_tokens(1) == tokens[:10]
    assert ask(engine, tokens, seq=1).reused_tokens == 10


def test_unified_cache_shares_a_copied_prefix(gguf_path: Path) -> None:
    """One 512-cell buffer: a 400-token prefix copied to a second sequence costs no cells; evaluating it again
    there would need 800 and fails."""
    with Engine(config(gguf_path, n_ctx=512, unified=True)) as eng:
        prefix = (eng.tokenize(TEXT_A * 20, add_bos=True))[:400]
        list(prefill(eng, prefix, seq=0))
        assert eng.kv_cells_used() == 400
        eng.seq_copy(0, 1)
        assert eng.kv_cells_used() == 400
        question = prefix + eng.tokenize(" and a question about it?")
        fin = ask(eng, question, seq=1, params=GenerationParams(max_tokens=8, ignore_eos=True))
        assert fin.reused_tokens == 400 and fin.completion_tokens == 8
        assert eng.kv_cells_used() == len(question) + 7  # the last sampled token is never decoded
        eng.seq_clear(1)
        with pytest.raises(EngineError, match="llama_decode failed"):  # negative control: no sharing, no room
            list(prefill(eng, question, seq=1))


def test_kv_cells_used_counts_each_sequence(gguf_path: Path) -> None:
    with Engine(config(gguf_path)) as eng:
        a, b = eng.tokenize(TEXT_A, add_bos=True), eng.tokenize(TEXT_B, add_bos=True)
        assert eng.kv_cells_used() == 0
        list(prefill(eng, a, seq=0))
        list(prefill(eng, b, seq=1))
        assert eng.kv_cells_used() == len(a) + len(b)
        eng.seq_truncate(0, 5)
        assert eng.kv_cells_used() == 5 + len(b)
        eng.seq_copy(1, 0)  # separate buffers: the copy has cells of its own
        assert eng.kv_cells_used() == 2 * len(b)
        eng.seq_clear(1)
        assert eng.kv_cells_used() == len(b)


def test_each_sequence_samples_with_its_own_sampler(gguf_path: Path) -> None:
    """Each sequence draws with its own seed and keeps its own penalty history. llama.cpp's kernels are not batch
    invariant: a sequence's logits in a batch of two differ from its logits alone by ~1e-6 after the prompt, and the
    difference grows as the cache fills (~5e-3 after five tokens on an AVX-512 CPU). A hot draw is compared at the first
    token only; the history over many tokens is compared greedily, where such noise does not move the argmax."""
    hot = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    plain = GREEDY
    no_repeats = replace(plain, presence_penalty=1000.0)   # a token sampled once is never sampled again
    with Engine(config(gguf_path)) as eng:
        a = eng.tokenize(TEXT_A, add_bos=True)

        def alone(sampling: Sampling, max_tokens: int = 16) -> list[int]:
            eng.seq_clear(0)  # the whole prompt in one decode, as in the batch
            return reply(eng, a, 0, sampling, max_tokens=max_tokens)

        first = {seed: alone(replace(hot, seed=seed), 1) for seed in range(1, 20)}
        one, two = next((x, y) for x in first for y in first if first[x] != first[y])  # draws that tell them apart
        plain_reply, no_repeats_reply = alone(plain), alone(no_repeats)
        assert len(set(plain_reply)) < len(plain_reply) == len(set(no_repeats_reply))  # the penalty shows
        eng.seq_clear(0)
        eng.set_sampler(0, replace(hot, seed=one))
        eng.set_sampler(1, replace(hot, seed=two))
        assert batched(eng, {0: a, 1: a}, 1) == {0: first[one], 1: first[two]}
        eng.seq_clear(0)
        eng.seq_clear(1)
        eng.set_sampler(0, no_repeats)
        eng.set_sampler(1, plain)
        assert batched(eng, {0: a, 1: a}, 16) == {0: no_repeats_reply, 1: plain_reply}


def test_generations_on_two_sequences_may_interleave(engine: Engine) -> None:
    a, b = engine.tokenize(TEXT_A, add_bos=True), engine.tokenize(TEXT_B, add_bos=True)
    alone = {0: reply(engine, a, 0), 1: reply(engine, b, 1)}
    engine.seq_clear(0)
    engine.seq_clear(1)
    params = GenerationParams(GREEDY, max_tokens=16, ignore_eos=True)
    first = generate(engine, Request(a, params), seq=0)
    second = generate(engine, Request(b, params), seq=1)
    ends: dict[int, Finished] = {}
    while len(ends) < 2:  # one record of each in turn: each decode of one sequence lands between two of the other
        for seq, gen in ((0, first), (1, second)):
            event = next(gen, None)
            if isinstance(event, Finished):
                ends[seq] = event
    assert list(ends[0].tokens) == alone[0] and list(ends[1].tokens) == alone[1]


def test_cancelling_one_sequence_leaves_the_other(engine: Engine) -> None:
    a, b = engine.tokenize(TEXT_A, add_bos=True), engine.tokenize(TEXT_B, add_bos=True)
    list(prefill(engine, a, seq=0))
    cancel = threading.Event()
    events = []
    params = GenerationParams(max_tokens=30, ignore_eos=True)
    for event in generate(engine, Request(b, params), seq=1, cancel=cancel):
        events.append(event)
        if isinstance(event, TextChunk) and sum(e.n_tokens for e in events if isinstance(e, TextChunk)) >= 3:
            cancel.set()
    fin = events[-1]
    assert fin.reason == "cancelled" and 3 <= fin.completion_tokens < 30
    assert engine.seq_len(1) == len(b) + fin.completion_tokens - 1
    assert engine.seq_tokens(0) == a


def test_sequence_state_file_moves_between_sequences(engine: Engine, gguf_path: Path, tmp_path: Path) -> None:
    b = engine.tokenize(TEXT_B, add_bos=True)
    reply(engine, b, 1)
    saved = engine.seq_tokens(1)
    follow_up = saved + engine.tokenize(" Next?")
    expected = reply(engine, follow_up, 1)
    state = tmp_path / "seq1.state"
    engine.seq_truncate(1, len(saved))
    engine.save_state(state, seq=1)
    with Engine(engine.config) as other:
        assert other.load_state(state, seq=0) == len(saved)
        assert other.seq_tokens(0) == saved and other.seq_len(1) == 0
        fin = ask(other, follow_up, params=GenerationParams(GREEDY, max_tokens=16, ignore_eos=True),
                  pad_short_batches=False)
        assert fin.reused_tokens == len(saved)
        assert list(fin.tokens) == expected
    if not engine.config.kv_unified:  # a state holds its buffer layout: four buffers cannot take it
        with Engine(config(gguf_path, n_seq=4)) as four, pytest.raises(EngineError, match="not a session state"):
            four.load_state(state, seq=0)


def test_snapshot_restores_a_sequence_in_memory(engine: Engine) -> None:
    a = engine.tokenize(TEXT_A, add_bos=True)
    reply(engine, a, 0)
    snap = engine.snapshot(0)
    assert list(snap.tokens) == engine.seq_tokens(0) and snap.data
    follow_up = list(snap.tokens) + engine.tokenize(" More?")
    expected = reply(engine, follow_up, 0)
    assert engine.restore(snap, 1) == len(snap.tokens)
    fin = ask(engine, follow_up, seq=1, params=GenerationParams(GREEDY, max_tokens=16, ignore_eos=True),
              pad_short_batches=False)
    assert fin.reused_tokens == len(snap.tokens)
    assert list(fin.tokens) == expected
    with pytest.raises(EngineError, match="not a sequence state"):
        engine.restore(type(snap)(snap.tokens, b"not a state"), 1)
    assert engine.seq_len(1) == 0


def test_a_copy_is_complete_before_it_is_saved(gguf_path: Path, tmp_path: Path) -> None:
    """Between separate buffers llama.cpp copies at the next decode; saving the copy first still saves the data."""
    with Engine(config(gguf_path)) as eng:
        a = eng.tokenize(TEXT_A, add_bos=True)
        list(prefill(eng, a, seq=0))
        eng.seq_copy(0, 1)
        eng.save_state(tmp_path / "copy.state", seq=1)
        expected = reply(eng, a + eng.tokenize(" Go on."), 0)
    with Engine(config(gguf_path)) as other:
        other.load_state(tmp_path / "copy.state", seq=0)
        fin = ask(other, a + other.tokenize(" Go on."), params=GenerationParams(GREEDY, max_tokens=16, ignore_eos=True),
                  pad_short_batches=False)
        assert fin.reused_tokens == len(a)
        assert list(fin.tokens) == expected


def test_a_queued_copy_does_not_overwrite_a_restored_sequence(gguf_path: Path, tmp_path: Path) -> None:
    """The buffer copy llama.cpp queues for the next decode must not land on top of a state loaded before it."""
    with Engine(config(gguf_path)) as eng:
        a, b = eng.tokenize(TEXT_A, add_bos=True), eng.tokenize(TEXT_B, add_bos=True)
        list(prefill(eng, b, seq=1))
        snap = eng.snapshot(1)
        eng.save_state(tmp_path / "b.state", seq=1)
        expected = reply(eng, b + eng.tokenize(" Go on."), 1)
        list(prefill(eng, a, seq=0))
        for load in (lambda: eng.restore(snap, 1), lambda: eng.load_state(tmp_path / "b.state", seq=1)):
            eng.seq_copy(0, 1)
            assert load() == len(b)
            assert reply(eng, b + eng.tokenize(" Go on."), 1) == expected


def test_step_api_refuses_what_llama_cpp_cannot_do(gguf_path: Path) -> None:
    with Engine(config(gguf_path)) as eng:
        a = eng.tokenize(TEXT_A, add_bos=True)
        with pytest.raises(ValueError, match="sequence 2 does not exist"):
            eng.decode([Feed(2, a)])
        with pytest.raises(ValueError, match="twice"):
            eng.decode([Feed(0, a), Feed(0, a)])
        with pytest.raises(ValueError, match="the batch holds 256"):
            eng.decode([Feed(0, [a[0]] * 200), Feed(1, [a[0]] * 100)])
        eng.decode([Feed(0, [a[0]] * 256, logits=False)])
        eng.decode([Feed(0, [a[0]] * 256, logits=False)])
        with pytest.raises(EngineError, match="513 tokens do not fit its 512-token context"):
            eng.decode([Feed(0, [a[0]])])
        eng.seq_clear(0)
        with pytest.raises(ValueError, match="no sampler"):
            eng.sample(0)
        eng.set_sampler(0, GREEDY)
        eng.decode([Feed(0, a, logits=False)])
        with pytest.raises(ValueError, match="no logits"):
            eng.sample(0)
        eng.decode([Feed(0, [a[0]])])
        logits = eng.logits(0)
        assert logits.shape == (eng.n_vocab,) and int(logits.argmax()) == eng.sample(0)  # greedy: the top logit
        with pytest.raises(ValueError, match="no logits"):  # once per decode
            eng.sample(0)


def test_a_prompt_plan_through_the_step_api_answers_as_the_loop(gguf_path: Path) -> None:
    """What a server does with a new request: plan the prompt against what the sequence holds, feed the chunks,
    sample. On a CPU with flash attention the plan never has a 2-63-token chunk."""
    with Engine(config(gguf_path, flash_attn=True)) as eng:
        document = eng.tokenize(TEXT_A * 4, add_bos=True)[:150]
        question = document + eng.tokenize(" and then?")
        expected = reply(eng, question, 1)  # from scratch, on the other sequence
        fresh = eng.plan_prompt(0, document, chunk=128, sample=False)
        assert fresh.reused == 0 and [len(c) for c in fresh.chunks] == [86, 64]  # not 128 + 22
        exact = eng.plan_prompt(0, document, chunk=128, sample=False, pad_short_batches=False)
        assert [len(c) for c in exact.chunks] == [128, 22]
        for chunk in fresh.chunks:
            eng.decode([Feed(0, chunk, logits=False)])
        plan = eng.plan_prompt(0, question, chunk=128)
        assert len(question) - len(document) < 64
        assert plan.reused == len(question) - 64 and [len(c) for c in plan.chunks] == [64]
        assert sum(map(len, plan.chunks)) == plan.n_tokens == len(question) - plan.reused
        eng.set_sampler(0, GREEDY)
        eng.decode([Feed(0, plan.chunks[0])])
        got = []
        for _ in range(16):
            got.append(eng.sample(0))
            eng.decode([Feed(0, got[-1:])])
        assert got == expected
