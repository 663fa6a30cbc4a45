"""lcrun.generation on its own: the stop-string matcher against a brute-force reference over every way of cutting the
text into pieces, its bounds, the request record's refusals, and the decode loop's slots on the fake engine —
several requests in one batch, prompt-only requests, cancellation before a request starts, and a decode llama.cpp
refuses ending only the requests in that batch. (The loop on llama.cpp: tests/test_engine_*.py; chat and serve alike:
tests/test_generation_front_ends.py.)"""
from __future__ import annotations

import random
import threading

import pytest

from lcrun.engine.protocol import GREEDY, Feed
from lcrun.errors import EngineError
from lcrun.generation.loop import DecodeLoop
from lcrun.generation.records import (MAX_STOP_BYTES, MAX_STOP_STRINGS, Failed, Finished, GenerateEvent,
                                      GenerationParams, Request, RequestError, TextChunk)
from lcrun.generation.slots import Phase
from lcrun.generation.stops import StopMatcher
from tests.fixtures.cli import assert_one_line_error, invoke
from tests.fixtures.fake_engine import FakeEngine


# -- stop strings -----------------------------------------------------------------------------------------------------
def first_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The reference: the text before the stop string that is complete first (the longer where two end together)."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            key = (at + len(stop), -len(stop), stop)
            best = key if best is None or key < best else best
    if best is None:
        return text, None
    end, _, stop = best
    return text[: end - len(stop)], stop


def streamed(pieces: list[str], stops: list[str]) -> tuple[str, str | None, int]:
    matcher = StopMatcher(stops)
    out, longest_held = [], 0
    for piece in pieces:
        text, stop = matcher.feed(piece)
        out.append(text)
        longest_held = max(longest_held, len(matcher.held))
        if stop is not None:
            return "".join(out), stop, longest_held
    return "".join(out) + matcher.flush(), None, longest_held


@pytest.mark.parametrize("seed", range(40))
def test_the_matcher_finds_what_the_reference_finds_however_the_text_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abé✓ "
    stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
    text = "".join(rng.choices(alphabet, k=rng.randint(0, 60)))
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    out, stop, held = streamed(pieces, stops)
    assert (out, stop) == first_stop(text, stops), (pieces, stops)
    assert held < max(map(len, stops))  # never more than a stop string's start is held back


def test_overlapping_stop_strings_end_at_the_first_completed() -> None:
    assert streamed(["say hel", "lo w", "orld"], ["hello world", "wor"]) == ("say hello ", "wor", 7)
    assert streamed(["ab", "cd"], ["abcd", "c"]) == ("ab", "c", 2)
    assert streamed(["xabc"], ["abc", "bc"]) == ("x", "abc", 0)   # both end at c: the longer one
    assert streamed(["no match at all"], ["zz"]) == ("no match at all", None, 0)


def test_stop_strings_are_bounded() -> None:
    GenerationParams(stop=("x" * MAX_STOP_BYTES,) * MAX_STOP_STRINGS).check()
    for stops, message in [(("x" * (MAX_STOP_BYTES + 1),), f"at most {MAX_STOP_BYTES}"),
                           (("é" * (MAX_STOP_BYTES // 2 + 1),), "bytes"),           # counted in UTF-8 bytes
                           (("x",) * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS}"),
                           (("",), "empty")]:
        with pytest.raises(RequestError, match=message) as caught:
            GenerationParams(stop=stops).check()
        assert caught.value.param == "stop"


@pytest.mark.parametrize(("field", "value"), [("grammar", "root ::= \"x\""), ("logprobs", 5), ("n", 2),
                                              ("draft", object()), ("max_tokens", -1)])
def test_what_is_not_built_yet_is_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(RequestError) as caught:
        GenerationParams(**{field: value}).check()  # type: ignore[arg-type]
    assert caught.value.param == field
    loop = DecodeLoop(FakeEngine())
    with pytest.raises(RequestError):  # the loop checks too: nothing reaches a slot unchecked
        loop.submit(loop.slots[0], Request([1, 2], GenerationParams(**{field: value})), print)  # type: ignore[arg-type]
    assert loop.slots[0].phase is Phase.IDLE


def test_the_front_ends_refuse_a_stop_string_beyond_the_bound(tmp_path: object) -> None:
    result = invoke("chat", "demo", "-p", "hi", "--stop", "x" * (MAX_STOP_BYTES + 1), "--dry-run")
    assert_one_line_error(result, "--stop:", f"at most {MAX_STOP_BYTES}")
    from lcrun.serve.openai_api import ChatCompletionRequest, validate
    from lcrun.serve.openai_api import APIError

    with pytest.raises(APIError) as caught:
        validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}],
                                         "stop": ["y" * (MAX_STOP_BYTES + 1)]})
    assert (caught.value.status, caught.value.param) == (400, "stop")


# -- the loop's slots -------------------------------------------------------------------------------------------------
def run_until_idle(loop: DecodeLoop, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not loop.busy:
            return
        loop.step()
    raise AssertionError("the loop did not finish")


def collect() -> tuple[list[GenerateEvent], object]:
    events: list[GenerateEvent] = []
    return events, events.append


def text(events: list[GenerateEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def test_two_requests_share_each_decode_and_answer_as_each_alone() -> None:
    engine = FakeEngine(n_ctx=4096, n_seq=2, responder=lambda prompt: f"echo {prompt[-3:]}")
    loop = DecodeLoop(engine, prefill_chunk=8)
    a, b = collect(), collect()
    loop.submit(loop.slots[0], Request(engine.tokenize("first prompt", add_bos=True), GenerationParams(GREEDY)), a[1])
    loop.submit(loop.slots[1], Request(engine.tokenize("second", add_bos=True), GenerationParams(GREEDY)), b[1])
    run_until_idle(loop)
    assert (text(a[0]), text(b[0])) == ("echo mpt", "echo ond")
    assert any(sorted(seq for seq, _ in d) == [0, 1] and all(n == 1 for _, n in d) for d in engine.decodes)
    assert isinstance(a[0][-1], Finished) and a[0][-1].reason == "stop"


def test_a_prompt_only_request_evaluates_the_prompt_and_samples_nothing() -> None:
    engine = FakeEngine()
    loop = DecodeLoop(engine)
    tokens = engine.tokenize("a document to keep", add_bos=True)
    events, sink = collect()
    loop.submit(loop.slots[0], Request(tokens, GenerationParams(max_tokens=0)), sink)
    run_until_idle(loop)
    assert engine.cached_tokens == tokens and engine.samplers == {}
    assert events[-1] == Finished("length", len(tokens), 0, 0, events[-1].time_to_first_token_s,
                                  events[-1].prefill_tokens_per_s, 0.0)
    again, sink = collect()  # all of it cached already: done without a decode
    decodes = len(engine.decodes)
    loop.submit(loop.slots[0], Request(tokens, GenerationParams(max_tokens=0)), sink)
    assert len(engine.decodes) == decodes and again[-1].reused_tokens == len(tokens)


def test_a_request_cancelled_while_it_waits_ends_at_the_next_step() -> None:
    loop = DecodeLoop(FakeEngine())
    cancel = threading.Event()
    events, sink = collect()
    loop.assign(loop.slots[0], Request([1, 1000, 1001]), sink, cancel=cancel)
    loop.step()
    assert loop.slots[0].phase is Phase.WAITING and events == []
    cancel.set()
    assert loop.busy
    loop.step()
    assert [e.reason for e in events] == ["cancelled"] and loop.slots[0].phase is Phase.IDLE  # type: ignore[union-attr]


class Refusing(FakeEngine):
    """A fake whose llama_decode fails for any batch holding sequence 1's tokens."""

    def decode(self, feeds: list[Feed]) -> None:  # type: ignore[override]
        if any(feed.seq == 1 for feed in feeds):
            raise EngineError("fake.gguf", "llama_decode failed (1: no free KV cells for the batch)")
        super().decode(feeds)


def test_a_refused_decode_ends_only_the_request_whose_decode_it_is() -> None:
    engine = Refusing(n_ctx=4096, n_seq=3, responder=lambda prompt: "a long enough reply")
    loop = DecodeLoop(engine, prefill_chunk=64)
    first, second = collect(), collect()
    loop.submit(loop.slots[0], Request(engine.tokenize("one", add_bos=True)), first[1])
    loop.step()                                                   # slot 0 alone: prefilled, first token out
    loop.submit(loop.slots[1], Request(engine.tokenize("two", add_bos=True)), second[1])
    loop.step()                                      # slots 0 and 1 together: refused, then each alone
    assert isinstance(second[0][-1], Failed) and "no free KV cells" in str(second[0][-1].error)
    assert loop.slots[1].phase is Phase.IDLE and engine.seq_len(1) == 0
    assert [len(d) for d in engine.decodes[-1:]] == [1]              # slot 0's token went through alone
    run_until_idle(loop)
    assert text(first[0]) == "a long enough reply" and first[0][-1].reason == "stop"  # type: ignore[union-attr]
    third = collect()                                              # the loop goes on
    loop.submit(loop.slots[2], Request(engine.tokenize("three", add_bos=True)), third[1])
    run_until_idle(loop)
    assert text(third[0]) == "a long enough reply" and third[0][-1].reason == "stop"  # type: ignore[union-attr]
