"""The server's HTTP layer against the official OpenAI client, on a live uvicorn server on 127.0.0.1, over the fake
several-sequence engine (whose reply to a prompt is known): OpenAI's shapes streamed and not, usage, finish reasons,
stop strings, several requests batched in one decode, chunked prefill beside generating slots, prefix reuse between
slots, the disk prompt cache across a restart, bad input as OpenAI error objects, the queue bound, the API key, and a
client that goes away mid-stream."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest

from lcrun.engine.protocol import EngineProtocol
from lcrun.serve.scheduler import BUSY_PREFILL_TOKENS
from lcrun.serve.server import ServeOptions
from tests.fixtures.fake_engine import LLAMA3_CHAT_TEMPLATE, FakeEngine
from tests.fixtures.serve_support import LiveServer, http, metrics, wait_for
from tests.fixtures.serve_support import engine, server  # noqa: F401  (the fake engine behind a live server)

USER = "<|start_header_id|>user<|end_header_id|>\n\n"


def render(messages: list[dict[str, str]]) -> str:
    from lcrun.chat.template import ChatTemplate

    return ChatTemplate(LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>").render(messages)


def test_the_fake_engine_claims_the_engine_protocol(engine: FakeEngine) -> None:
    assert isinstance(engine, EngineProtocol)


def test_models_and_health(server: LiveServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "lcrun"
    status, _, body = http("GET", server.url + "/health")
    assert status == 200 and b'"status":"ok"' in body


def test_chat_completion(server: LiveServer, engine: FakeEngine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    out = server.client().chat.completions.create(model="fake-model", messages=messages, temperature=0, seed=7)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "fake-model"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "You said: hello there"
    assert choice.finish_reason == "stop"
    prompt = engine.tokenize(render(messages))
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == len("You said: hello there") + 1  # and <|eot_id|>
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    sampling = engine.samplers[0]
    assert (sampling.temperature, sampling.seed) == (0.0, 7)


def test_penalties_reach_the_sampler(server: LiveServer, engine: FakeEngine) -> None:
    messages = [{"role": "user", "content": "hello"}]
    server.client().chat.completions.create(model="fake-model", messages=messages, frequency_penalty=0.5,
                                            presence_penalty=-0.25)
    penalties = lambda: {(s.frequency_penalty, s.presence_penalty) for s in engine.samplers.values()}  # noqa: E731
    assert penalties() == {(0.5, -0.25)}
    engine.samplers.clear()
    server.client().completions.create(model="fake-model", prompt="x")
    assert penalties() == {(0.0, 0.0)}


def test_chat_completion_streamed(server: LiveServer) -> None:
    stream = server.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "stream me"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: stream me"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text) + 1


def test_completions_streamed_and_not(server: LiveServer, engine: FakeEngine) -> None:
    engine.responder = lambda prompt: f" and then {len(prompt.removeprefix('<|begin_of_text|>'))} characters"
    client = server.client()
    out = client.completions.create(model="fake-model", prompt="Once upon a time")
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == " and then 16 characters" and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == 1 + len("Once upon a time")  # BOS, as the vocabulary asks
    streamed = client.completions.create(model="fake-model", prompt="Once upon a time", stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == " and then 16 characters"
    assert chunks[-1].choices[0].finish_reason == "stop"
    by_ids = client.completions.create(model="fake-model", prompt=engine.tokenize("Once upon a time", add_bos=True))
    assert by_ids.choices[0].text == " and then 16 characters"


def test_max_tokens_ends_with_length(server: LiveServer) -> None:
    client = server.client()
    out = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                         max_tokens=4)
    assert out.choices[0].message.content == "You " and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 4
    newer = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                           max_completion_tokens=3)
    assert newer.choices[0].message.content == "You" and newer.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply_before_them(server: LiveServer, engine: FakeEngine, stream: bool) -> None:
    engine.responder = lambda _: "alpha beta STOP gamma"
    client = server.client()
    kw = dict(model="fake-model", messages=[{"role": "user", "content": "q"}], stop=["zzz", "STOP"])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        out = client.chat.completions.create(**kw)
        text, reason = out.choices[0].message.content, out.choices[0].finish_reason
    assert (text, reason) == ("alpha beta ", "stop")
    # a partial match that does not complete is sent in the end
    engine.responder = lambda _: "alpha ST"
    out = client.chat.completions.create(**kw)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == ("alpha ST", "stop")


def test_four_requests_in_parallel_are_decoded_together(server: LiveServer, engine: FakeEngine) -> None:
    engine.step_delay_s = 0.01
    client = server.client()
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        out = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"n{i}" * 8}])
        answers[i] = out.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == {i: "You said: " + f"n{i}" * 8 for i in range(4)}
    generation_steps = [d for d in engine.decodes if all(n == 1 for _, n in d)]
    assert max(len(d) for d in generation_steps) == 4   # four slots' tokens in one decode
    assert all([s for s, _ in d] == sorted(s for s, _ in d) for d in engine.decodes)  # sequence ids in order


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_generating_slot(server: LiveServer,
                                                                          engine: FakeEngine) -> None:
    engine.step_delay_s = 0.005
    engine.responder = lambda prompt: "y" * 200 if prompt.endswith("short") else "done"
    client = server.client()
    stream = client.completions.create(model="fake-model", prompt="short", stream=True)
    chunks = iter(stream)
    next(chunks)  # slot 0 is generating
    long_prompt = "z" * 1800
    out = client.completions.create(model="fake-model", prompt=long_prompt)
    rest = "".join(c.choices[0].text for c in chunks)
    assert out.choices[0].text == "done" and len(rest) > 0
    long_tokens = engine.tokenize(long_prompt, add_bos=True)
    long_seq = next(s for s in range(4) if engine.seq_tokens(s)[: len(long_tokens)] == long_tokens)
    prefill_steps = [d for d in engine.decodes if any(s == long_seq and n > 1 for s, n in d)]
    assert len(prefill_steps) >= len(long_tokens) // BUSY_PREFILL_TOKENS
    beside = [d for d in prefill_steps if len(d) == 2]
    assert beside, "the other slot kept generating during the prefill"
    assert all(n <= BUSY_PREFILL_TOKENS for d in beside for s, n in d if s == long_seq)


def test_a_prompt_reuses_the_longest_prefix_any_slot_holds(server: LiveServer, engine: FakeEngine) -> None:
    client = server.client()
    document = "The document. " * 100
    first = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": document + "Q1"}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    follow = client.chat.completions.create(model="fake-model", messages=[
        {"role": "user", "content": document + "Q1"}, {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Q2"}])
    assert follow.usage.prompt_tokens_details.cached_tokens >= len(document)
    # while that slot is busy, another request with the same document starts elsewhere from a copy of its cache
    engine.step_delay_s = 0.01
    engine.responder = lambda prompt: "long answer " * 20
    busy = client.chat.completions.create(model="fake-model", stream=True,
                                          messages=[{"role": "user", "content": document + "Q3"}])
    next(iter(busy))
    other = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": document + "Q4"}])
    assert other.usage.prompt_tokens_details.cached_tokens >= len(document)
    busy.close()
    reused = metrics(server.url)["lcrun_cache_reused_tokens_total"]
    assert reused >= 3 * len(document)


def test_bad_requests_are_openai_errors_and_the_server_goes_on(server: LiveServer) -> None:
    url = server.url + "/v1/chat/completions"
    status, _, body = http("POST", url, b"{not json")
    assert status == 400 and b'"code":"invalid_json"' in body and b'"type":"invalid_request_error"' in body
    status, _, body = http("POST", url, b"[1, 2]")
    assert status == 400
    for bad, param in [({"messages": "hi"}, "messages"), ({"messages": []}, "messages"),
                       ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
                       ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
                       ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
                       ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
                       ({"messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
                       ({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
                       ({}, "messages")]:
        status, _, body = http("POST", url, bad)
        assert status == 400, (bad, body)
        import json

        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (bad, error)
    status, _, body = http("POST", server.url + "/v1/completions", {"prompt": 3})
    assert status == 400 and b'"param":"prompt"' in body
    status, _, body = http("GET", server.url + "/v1/nothing")
    assert status == 404 and b'"error"' in body
    status, _, body = http("GET", url)
    assert status == 405 and b'"error"' in body
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"
    assert client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}]).choices
    out = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "still here"}])
    assert out.choices[0].message.content == "You said: still here"


def test_a_prompt_longer_than_a_slot_is_refused_with_the_counts(server: LiveServer) -> None:
    client = server.client()
    n_ctx_slot = server.state.n_ctx_slot
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="fake-model", prompt="w" * (n_ctx_slot - 1))  # and BOS
    assert caught.value.code == "context_length_exceeded"
    assert f"context length is {n_ctx_slot} tokens" in caught.value.message
    assert f"resulted in {n_ctx_slot} tokens" in caught.value.message
    # one token less fits, and the reply is cut at the end of the slot, not the prompt
    out = client.completions.create(model="fake-model", prompt="w" * (n_ctx_slot - 2))
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 1


def test_a_full_queue_answers_503_with_retry_after(engine: FakeEngine) -> None:
    engine.n_seq = 1
    engine.__post_init__()
    engine.step_delay_s = 0.01
    engine.responder = lambda _: "slow " * 40
    with LiveServer(engine, ServeOptions(max_queue=1)) as live:
        client = live.client()
        busy = client.completions.create(model="fake-model", prompt="a", stream=True)
        next(iter(busy))
        waiting = threading.Thread(target=lambda: client.completions.create(model="fake-model", prompt="b"))
        waiting.start()
        assert wait_for(lambda: live.state.scheduler.queue_length == 1)
        status, headers, body = http("POST", live.url + "/v1/completions", {"prompt": "c"})
        assert status == 503 and int(headers["retry-after"]) >= 1 and b'"code":"queue_full"' in body
        busy.close()
        waiting.join(30)
        assert client.completions.create(model="fake-model", prompt="d").choices


def test_api_key(engine: FakeEngine) -> None:
    with LiveServer(engine, ServeOptions(api_key="sesame")) as live:
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").models.with_raw_response.retrieve("x")  # any protected call
        with pytest.raises(openai.AuthenticationError) as caught:
            live.client(api_key="wrong").chat.completions.create(model="fake-model",
                                                                 messages=[{"role": "user", "content": "x"}])
        assert caught.value.code == "invalid_api_key"
        status, _, _ = http("POST", live.url + "/v1/completions", {"prompt": "x"})
        assert status == 401
        assert http("GET", live.url + "/metrics")[0] == 401
        assert http("GET", live.url + "/health")[0] == 200           # open, as in llama-server
        assert http("GET", live.url + "/v1/models")[0] == 200
        out = live.client(api_key="sesame").completions.create(model="fake-model", prompt="x")
        assert out.choices[0].finish_reason == "stop"
        assert http("POST", live.url + "/v1/completions", {"prompt": "x"}, {"X-Api-Key": "sesame"})[0] == 200
        assert metrics(live.url, {"Authorization": "Bearer sesame"})[
            'lcrun_requests_total{endpoint="/v1/completions",code="401"}'] == 1


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server: LiveServer, engine: FakeEngine) -> None:
    engine.step_delay_s = 0.02
    engine.responder = lambda _: "never ending " * 100
    client = server.client()
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "go"}],
                                            stream=True)
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    stream.close()
    assert wait_for(lambda: metrics(server.url)["lcrun_slots_busy"] == 0, 5)
    seen = metrics(server.url)
    assert seen["lcrun_requests_cancelled_total"] == 1
    decodes = len(engine.decodes)
    time.sleep(0.2)
    assert len(engine.decodes) == decodes  # no decoding for the cancelled request
    assert seen["lcrun_generated_tokens_total"] < 30  # within a few tokens of the disconnect


def test_a_non_streaming_client_that_disconnects_frees_its_slot(server: LiveServer,
                                                                engine: FakeEngine) -> None:
    engine.step_delay_s = 0.02
    engine.responder = lambda _: "never ending " * 100
    client = server.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "go"}])
    assert wait_for(lambda: metrics(server.url)["lcrun_slots_busy"] == 0, 5)
    assert metrics(server.url)["lcrun_requests_cancelled_total"] == 1


def test_metrics_are_prometheus_text(server: LiveServer) -> None:
    server.client().completions.create(model="fake-model", prompt="count me")
    status, headers, body = http("GET", server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for name in ("lcrun_requests_total", "lcrun_prompt_tokens_total", "lcrun_generated_tokens_total",
                 "lcrun_cache_reused_tokens_total", "lcrun_slots_busy", "lcrun_queue_length", "lcrun_kv_cells_used"):
        assert f"# TYPE {name} " in text
    seen = metrics(server.url)
    assert seen["lcrun_prompt_tokens_total"] == 1 + len("count me")
    assert seen["lcrun_generated_tokens_total"] > 0 and seen["lcrun_slots_total"] == 4
    assert seen['lcrun_requests_total{endpoint="/v1/completions",code="200"}'] == 1
    assert seen["lcrun_kv_cells_used"] > 0


def test_the_disk_prompt_cache_survives_a_restart(tmp_path: Path) -> None:
    options = ServeOptions(cache_dir=tmp_path / "cache", cache_min_tokens=256)
    document = "Long shared document text. " * 40   # 1080 tokens in the fake vocabulary
    def engine() -> FakeEngine:
        return FakeEngine(n_ctx=8192, n_seq=2, responder=lambda _: "short")

    with LiveServer(engine(), options) as live:
        first = live.client().completions.create(model="fake-model", prompt=document + "question one")
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert wait_for(lambda: metrics(live.url)["lcrun_cache_saved_prompts_total"] == 1)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".lcrunkv"
    with LiveServer(engine(), options) as live:
        follow = live.client().completions.create(model="fake-model", prompt=document + "question two")
        cached = follow.usage.prompt_tokens_details.cached_tokens
        assert cached >= len(document) // 256 * 256
        restored = metrics(live.url)["lcrun_cache_restored_tokens_total"]
        assert restored // 128 * 128 == cached     # reported in whole 128-token blocks
        # a prompt sharing nothing (but BOS) restores nothing
        other = live.client().completions.create(model="fake-model", prompt="Unrelated. " * 100)
        assert other.usage.prompt_tokens_details.cached_tokens == 0
        assert metrics(live.url)["lcrun_cache_restored_tokens_total"] == restored
    # another model (fingerprint) never matches
    with LiveServer(engine(), options, fingerprint="0" * 64) as live:
        again = live.client().completions.create(model="fake-model", prompt=document + "question two")
        assert again.usage.prompt_tokens_details.cached_tokens == 0
        assert metrics(live.url)["lcrun_cache_restored_tokens_total"] == 0


def test_shutdown_ends_streams_in_flight_with_an_error_event(engine: FakeEngine) -> None:
    engine.step_delay_s = 0.02
    engine.responder = lambda _: "never ending " * 200
    live = LiveServer(engine, ServeOptions(shutdown_grace_s=0.3))
    client = live.client()
    stream = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "go"}],
                                            stream=True)
    chunks = iter(stream)
    next(chunks)
    stopper = threading.Thread(target=live.stop)
    started = time.monotonic()
    stopper.start()
    with pytest.raises(openai.APIError) as caught:
        for _ in chunks:
            pass
    assert "shut" in str(caught.value.message)
    stopper.join(30)
    assert time.monotonic() - started < 10
    assert not live.thread.is_alive()


@pytest.mark.parametrize("remember", [True, False], ids=["remembered", "negative-control"])
def test_a_reply_sent_back_keeps_the_tokens_it_was_sampled_as(engine: FakeEngine, remember: bool) -> None:
    from lcrun.serve.replies import ReplyMemory

    # a model may sample a control token mid-reply; its text comes back as message text, which tokenizes otherwise
    # (as characters: message text never becomes a special token)
    engine.reply_specials = True
    engine.responder = lambda _: "odd <|start_header_id|> spelling"
    with LiveServer(engine) as live:
        if not remember:
            live.state.replies = ReplyMemory(entries=0)
        client = live.client()
        question = [{"role": "user", "content": "The document. " * 30 + "Q1"}]
        first = client.chat.completions.create(model="fake-model", messages=question)
        reply = first.choices[0].message.content
        assert reply == "odd <|start_header_id|> spelling"
        before = metrics(live.url)["lcrun_cache_reused_tokens_total"]
        client.chat.completions.create(model="fake-model", messages=[
            *question, {"role": "assistant", "content": reply}, {"role": "user", "content": "Q2"}])
        cached = metrics(live.url)["lcrun_cache_reused_tokens_total"] - before   # to the token (usage: in blocks)
        if remember:  # the first prompt and every reply token but the last (sampled, never decoded) are reused
            assert cached == first.usage.prompt_tokens + first.usage.completion_tokens - 1
        else:
            assert cached == first.usage.prompt_tokens + len("odd ")


def test_reply_memory_takes_a_remembered_prefix_only_at_a_token_boundary() -> None:
    from lcrun.serve.replies import ReplyMemory

    def tokenize(text: str) -> list[int]:  # "ab" is one token, everything else a character
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(-1)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    memory = ReplyMemory()
    memory.remember("xa", [7, 8])
    assert memory.tokenize("xay", tokenize) == [7, 8, ord("y")]
    assert memory.tokenize("xab", tokenize) == tokenize("xab")   # "a" + "b" would split the token "ab"
    assert memory.tokenize("zzz", tokenize) == tokenize("zzz")


@pytest.mark.parametrize("on_disk", [True, False], ids=["restored-without-a-copy", "negative-control-copied"])
def test_the_disk_or_another_slot_is_chosen_before_anything_is_copied(tmp_path: Path, on_disk: bool) -> None:
    import json

    from lcrun.engine.protocol import SequenceState
    from lcrun.generation.records import Finished, Request
    from lcrun.serve.prompt_cache import PromptCache
    from lcrun.serve.scheduler import Job, Scheduler

    engine = FakeEngine(n_ctx=8192, n_seq=2, responder=lambda _: "busy " * 80, step_delay_s=0.002)
    copies: list[tuple] = []
    copy = engine.seq_copy
    engine.seq_copy = lambda *args: (copies.append(args), copy(*args))[1]  # type: ignore[method-assign]
    document = engine.tokenize("Long shared document text. " * 40, add_bos=True)   # 1,081 tokens
    cache = PromptCache(tmp_path / "cache", "f" * 64, max_bytes=1 << 30, min_tokens=256)
    if on_disk:  # a saved state holding the whole document (found by its 4 full 256-token blocks)
        saved = tuple(document + engine.tokenize("earlier question"))
        cache.store(SequenceState(saved, json.dumps({"fake_sequence_state": list(saved)}).encode()))
    scheduler = Scheduler(engine, prompt_cache=cache)
    scheduler.start()
    try:
        events: dict[str, list] = {"first": [], "second": []}
        first = Job(Request(document[:300] + engine.tokenize("other question")), events["first"].append)
        scheduler.submit(first)  # slot 0 holds 300 tokens of the document and keeps generating
        assert wait_for(lambda: len(engine.decodes) > 5 and scheduler.busy_slots == 1)
        second = Job(Request(document + engine.tokenize("question two")), events["second"].append)
        scheduler.submit(second)
        assert wait_for(lambda: any(isinstance(e, Finished) for e in events["second"]), timeout=30)
        done = next(e for e in events["second"] if isinstance(e, Finished))
        if on_disk:
            assert copies == []                                   # the copy would have been overwritten
            assert done.restored_tokens == done.reused_tokens == len(document)
        else:
            assert copies == [(0, 1, 300)]                        # slot 0's share of the document, copied to slot 1
            assert done.restored_tokens == 0 and done.reused_tokens == 300
    finally:
        scheduler.close(grace_s=0.1)
