"""Admission (issue 20: 3, 5), over a live server and the fake engine: a request takes its place in the bound — every
slot busy and `--max-queue` waiting — before its body is parsed and its prompt tokenized, so a flood of huge prompts
at a full server costs no tokenization; `--max-queue 0` means no waiting, not no requests; a request that fails
before it reaches the scheduler gives its place back."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

from lcrun.serve.server import ServeOptions
from tests.fixtures.fake_engine import FakeEngine
from tests.fixtures.serve_support import LiveServer, http, metrics, wait_for


def counting_tokenizer(engine: FakeEngine, over: int) -> list[int]:
    """Record the length of every text longer than `over` characters that the engine tokenizes."""
    seen: list[int] = []
    tokenize = engine.tokenize

    def counted(text: str, **kw: bool) -> list[int]:
        if len(text) > over:
            seen.append(len(text))
        return tokenize(text, **kw)

    engine.tokenize = counted  # type: ignore[method-assign]
    return seen


def test_a_full_server_refuses_a_flood_of_huge_prompts_before_tokenizing_them() -> None:
    hold = threading.Event()    # the one slot generates its second token once the flood is over
    engine = FakeEngine(n_ctx=1 << 19, n_seq=1, responder=lambda _: "slow " * 4,
                        on_token=lambda i: hold.wait(30) if i == 1 else None)
    huge = counting_tokenizer(engine, over=100_000)
    with LiveServer(engine, ServeOptions(max_queue=1)) as live:
        client = live.client()
        busy = iter(client.completions.create(model="fake-model", prompt="a", stream=True))
        next(busy)
        waiting = threading.Thread(target=lambda: client.completions.create(model="fake-model", prompt="b"))
        waiting.start()
        assert wait_for(lambda: live.state.scheduler.queue_length == 1)
        prompt = "x" * 300_000        # 300,000 tokens each in the fake vocabulary
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: http("POST", live.url + "/v1/completions", {"prompt": prompt}),
                                    range(16)))
        assert [status for status, _, _ in answers] == [503] * 16
        assert all(json.loads(body)["error"]["code"] == "queue_full" for _, _, body in answers)
        assert huge == []             # not one of them was tokenized
        hold.set()
        for _ in busy:
            pass
        waiting.join(30)
        # negative control: the same prompt once there is room is tokenized (the counter sees it) and served
        status, _, body = http("POST", live.url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        assert status == 200 and huge == [len(prompt)], body


def test_max_queue_0_means_no_waiting_not_no_requests() -> None:
    engine = FakeEngine(n_ctx=8192, n_seq=2, step_delay_s=0.005,
                        responder=lambda p: "slow " * 30 if "busy" in p else "quick")
    with LiveServer(engine, ServeOptions(max_queue=0)) as live:
        client = live.client()
        assert client.completions.create(model="fake-model", prompt="idle slots").choices[0].text == "quick"
        streams = [iter(client.completions.create(model="fake-model", prompt=f"busy {i}", stream=True))
                   for i in range(2)]
        for stream in streams:
            next(stream)              # both slots generate
        status, headers, body = http("POST", live.url + "/v1/completions", {"prompt": "third"})
        assert status == 503 and int(headers["retry-after"]) >= 1 and b'"code":"queue_full"' in body
        bad = http("POST", live.url + "/v1/completions", {"prompt": 3})   # refused for room before its shape
        assert bad[0] == 503
        for stream in streams:
            for _ in stream:
                pass
        assert wait_for(lambda: metrics(live.url)["lcrun_slots_busy"] == 0)
        for _ in range(4):            # requests refused after admission give their place back
            assert http("POST", live.url + "/v1/completions", {"prompt": 3})[0] == 400
            assert http("POST", live.url + "/v1/completions", {"prompt": "w" * 9000})[0] == 400   # too long
        with ThreadPoolExecutor(2) as pool:   # so both slots are there again
            answers = list(pool.map(lambda i: client.completions.create(model="fake-model", prompt=f"again {i}"),
                                    range(2)))
        assert [a.choices[0].text for a in answers] == ["quick", "quick"]
        assert metrics(live.url)["lcrun_queue_length"] == 0
