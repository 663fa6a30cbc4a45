"""One failure ends only its request (issue 20: 4), over a live server and the fake engine with faults injected where
llama.cpp, the sampler, memory or the disk could fail: admitting a job, planning its prompt, decoding its prefill or
one of its tokens, sampling, snapshotting its state for the disk cache, writing that state. A request streaming beside
the failing one completes with its whole reply; the failing one gets its answer (an error, or its reply when only the
cache failed); the server is healthy after. And the disk cache's writer holds at most two states: more are dropped,
counted, and never make a request wait."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from lcrun.errors import EngineError
from lcrun.serve.prompt_cache import PromptCacheError
from lcrun.serve.scheduler import MAX_PENDING_SAVES
from lcrun.serve.server import ServeOptions
from tests.fixtures.fake_engine import CHAR_BASE, FakeEngine
from tests.fixtures.serve_support import LiveServer, http, metrics, wait_for

MARK = "\u2620"                        # in a prompt (or a reply): where the injected fault strikes
POISON = CHAR_BASE + ord(MARK)
BYSTANDER_REPLY = "the bystander's answer, token by token. " * 3
DOCUMENT = "A document long enough for the disk cache. " * 8   # 344 characters: above --cache-min-tokens 256


def _raise_if(condition: Callable[..., bool], error: Callable[[], Exception], method: Callable) -> Callable:
    def faulty(*args, **kwargs):  # type: ignore[no-untyped-def]
        if condition(*args, **kwargs):
            raise error()
        return method(*args, **kwargs)
    return faulty


def inject(engine: FakeEngine, live: LiveServer, where: str) -> None:
    holds = lambda seq: POISON in engine.seq_tokens(seq)  # noqa: E731
    if where == "admission":      # something unexpected while the job is being placed (it left the queue)
        engine.common_prefix = _raise_if(lambda seq, tokens: POISON in tokens, lambda: RuntimeError("boom"),
                                         engine.common_prefix)
    elif where == "plan":
        engine.plan_prompt = _raise_if(lambda seq, tokens, **_: POISON in tokens, lambda: RuntimeError("boom"),
                                       engine.plan_prompt)
    elif where in ("prefill decode", "token decode"):   # llama.cpp refusing a batch holding the poisoned tokens
        engine.decode = _raise_if(lambda feeds: any(POISON in f.tokens for f in feeds),
                                  lambda: EngineError("fake.gguf", "llama_decode failed (-3: compute error)"),
                                  engine.decode)
    elif where == "sample":
        engine.sample = _raise_if(holds, lambda: RuntimeError("sampler failed"), engine.sample)
    elif where == "snapshot":     # no memory for the state's copy
        engine.snapshot = _raise_if(holds, MemoryError, engine.snapshot)
    elif where == "write":        # a full disk
        cache = live.state.scheduler.prompt_cache
        assert cache is not None
        cache.store = _raise_if(lambda *a: True, lambda: PromptCacheError("cache/x.lcrunkv", "cannot be written "
                                                                          "(No space left on device)"), cache.store)
    else:
        raise AssertionError(where)


def responder(prompt: str) -> str:
    if "BYSTANDER" in prompt:
        return BYSTANDER_REPLY
    return f"early {MARK} late" if "REPLY POISON" in prompt else "the victim's answer"


@pytest.mark.parametrize(("where", "victim_gets"), [
    ("admission", 500), ("plan", 500), ("prefill decode", 500), ("token decode", 500), ("sample", 500),
    ("snapshot", 200), ("write", 200)])
def test_a_failure_ends_only_its_request(tmp_path: Path, where: str, victim_gets: int) -> None:
    engine = FakeEngine(n_ctx=8192, n_seq=2, responder=responder, step_delay_s=0.004)
    options = ServeOptions(cache_dir=tmp_path / "cache", cache_min_tokens=256)
    with LiveServer(engine, options) as live:
        inject(engine, live, where)
        stream = live.client().completions.create(model="fake-model", prompt="BYSTANDER", stream=True)
        chunks = iter(stream)
        first = next(chunks).choices[0].text
        victim = DOCUMENT + ("REPLY POISON" if where == "token decode" else MARK)
        status, _, body = http("POST", live.url + "/v1/completions", {"prompt": victim, "max_tokens": 40},
                               timeout=10)
        rest = [c.choices[0] for c in chunks]
        assert first + "".join(c.text for c in rest) == BYSTANDER_REPLY and rest[-1].finish_reason == "stop"
        assert status == victim_gets, body
        if victim_gets == 500:
            assert b"internal error (id " in body and b"boom" not in body and b"compute error" not in body
        else:   # the disk cache is best-effort: the reply is whole, the failure counted
            assert json.loads(body)["choices"][0]["text"] == "the victim's answer"
            assert wait_for(lambda: metrics(live.url)["lcrun_cache_save_failures_total"] == 1)
            assert metrics(live.url)["lcrun_cache_saved_prompts_total"] == 0
        assert wait_for(lambda: metrics(live.url)["lcrun_slots_busy"] == 0)
        again = live.client().completions.create(model="fake-model", prompt="BYSTANDER again")
        assert again.choices[0].text == BYSTANDER_REPLY   # the server goes on


def test_the_cache_writer_holds_two_states_and_never_makes_a_request_wait(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=8192, n_seq=1, responder=lambda _: "ok")
    snapshots: list[int] = []
    snapshot = engine.snapshot
    engine.snapshot = lambda seq: (snapshots.append(seq), snapshot(seq))[1]  # type: ignore[method-assign]
    with LiveServer(engine, ServeOptions(cache_dir=tmp_path / "cache", cache_min_tokens=256)) as live:
        cache = live.state.scheduler.prompt_cache
        assert cache is not None
        disk_free = threading.Event()
        store = cache.store
        cache.store = lambda *args: (disk_free.wait(60), store(*args))[1]  # type: ignore[method-assign]
        client = live.client()
        for i in range(5):   # each answered while the writer is stuck on the first
            assert client.completions.create(model="fake-model", prompt=f"{i} {DOCUMENT}").choices[0].text == "ok"
        seen = metrics(live.url)
        assert len(snapshots) == MAX_PENDING_SAVES == 2      # the dropped states were never copied out
        assert seen["lcrun_cache_saves_dropped_total"] == 3 and seen["lcrun_cache_saved_prompts_total"] == 0
        disk_free.set()
        assert wait_for(lambda: metrics(live.url)["lcrun_cache_saved_prompts_total"] == 2)
        client.completions.create(model="fake-model", prompt=f"5 {DOCUMENT}")   # room again: taken
        assert wait_for(lambda: metrics(live.url)["lcrun_cache_saved_prompts_total"] == 3)
        assert metrics(live.url)["lcrun_cache_saves_dropped_total"] == 3
