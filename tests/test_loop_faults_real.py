"""The decode loop's answer to a refused batch, on the real llama.cpp engine (issue 20: 4): a batch that fails after
llama.cpp has processed part of it (its first feed's tokens are in the cache) is decoded again one sequence at a
time, each truncated back to where it was — so the requests beside the failing one answer token for token as they
do with no fault at all, and only the failing one ends with `Failed`."""
from __future__ import annotations

from pathlib import Path

from lcrun.engine.protocol import GREEDY, EngineConfig, Feed
from lcrun.engine.runtime import Engine
from lcrun.errors import EngineError
from lcrun.generation.loop import DecodeLoop
from lcrun.generation.records import Failed, Finished, GenerateEvent, GenerationParams, Request

PROMPTS = ["The quick brown fox jumps over", "Rivers run to the sea because", "Once upon a time there was"]
POISONED = 2          # the request whose sequence llama.cpp "refuses" from its fifth token on


def run(engine: Engine, fault: bool) -> list[list[GenerateEvent]]:
    loop = DecodeLoop(engine, prefill_chunk=64)
    events: list[list[GenerateEvent]] = [[] for _ in PROMPTS]
    for slot, prompt, sink in zip(loop.slots, PROMPTS, events):
        engine.seq_clear(slot.seq)
        loop.submit(slot, Request(engine.tokenize(prompt, add_bos=True),
                                  GenerationParams(GREEDY, max_tokens=24, ignore_eos=True)), sink.append)
    decode, failures = engine.decode, [0]

    def refusing(feeds: list[Feed]) -> None:
        poisoned = [f for f in feeds if f.seq == POISONED]
        if fault and poisoned and engine.seq_len(POISONED) > len(engine.tokenize(PROMPTS[POISONED])) + 4:
            if len(feeds) > 1:   # as an abort after the first ubatch: some of the batch is in the cache already
                decode([feeds[0]])
            failures[0] += 1
            raise EngineError("llama_decode", "failed (-3: compute error)")
        decode(feeds)

    engine.decode = refusing  # type: ignore[method-assign]
    try:
        for _ in range(500):
            if not loop.busy:
                break
            loop.step()
    finally:
        engine.decode = decode  # type: ignore[method-assign]
    assert failures[0] == (2 if fault else 0)   # the batch, then the poisoned sequence alone
    return events


def test_the_requests_beside_a_refused_batch_answer_as_with_no_fault(tiny_gguf: Path) -> None:
    with Engine(EngineConfig(model_path=tiny_gguf, n_ctx=768, n_threads=1, n_seq=3, n_batch=256, n_ubatch=256,
                             flash_attn=False)) as engine:
        clean = run(engine, fault=False)
        faulty = run(engine, fault=True)
    for i, (ok, got) in enumerate(zip(clean, faulty)):
        done = [e for e in ok if isinstance(e, Finished)]
        assert len(done) == 1 and len(done[0].tokens) == 24
        if i == POISONED:
            assert isinstance(got[-1], Failed) and "compute error" in str(got[-1].error)
        else:
            ended = got[-1]
            assert isinstance(ended, Finished) and ended.tokens == done[0].tokens, i
