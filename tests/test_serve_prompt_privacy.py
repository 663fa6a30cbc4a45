"""What one client can learn of another's prompt (issue 20: 2), over a live server and the fake engine: cached tokens
are reported in whole 128-token blocks, and with several API keys a prefix cached for one key — in the slot it ran
on, copied to another slot, or in a disk cache file, also after a restart — is never reused for another key's
request (it pays the full prefill, as the metrics show), while the same key's next request reuses it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lcrun.serve.server import ServeOptions
from tests.fixtures.fake_engine import FakeEngine
from tests.fixtures.serve_support import LiveServer, metrics, wait_for

ALICE, BOB = "key-of-alice", "key-of-bob"
DOCUMENT = "Alice's confidential document, line after line. " * 25     # 1,225 tokens in the fake vocabulary
BLOCK = 128


class Asker:
    def __init__(self, live: LiveServer) -> None:
        self.live = live

    def seen(self) -> Any:
        return metrics(self.live.url, {"Authorization": f"Bearer {ALICE}"})

    def __call__(self, key: str, prompt: str, **kw: Any) -> tuple[int, int, int, int]:
        """(prompt tokens, cached tokens as reported, reused tokens to the token, tokens evaluated)."""
        before = self.seen()
        out = self.live.client(api_key=key).completions.create(model="fake-model", prompt=prompt, max_tokens=2, **kw)
        after = self.seen()
        delta = {name: after[f"lcrun_{name}_total"] - before[f"lcrun_{name}_total"]
                 for name in ("cache_reused_tokens", "prompt_tokens_evaluated")}
        return (out.usage.prompt_tokens, out.usage.prompt_tokens_details.cached_tokens,
                int(delta["cache_reused_tokens"]), int(delta["prompt_tokens_evaluated"]))


def test_cached_tokens_in_blocks_and_each_keys_prefixes_its_own_on_one_slot() -> None:
    engine = FakeEngine(n_ctx=8192, n_seq=1, responder=lambda _: "ok")
    with LiveServer(engine, ServeOptions(api_keys=(ALICE, BOB))) as live:
        ask = Asker(live)
        n, cached, reused, evaluated = ask(ALICE, DOCUMENT + "Q1")
        assert (cached, reused, evaluated) == (0, 0, n)
        n, cached, reused, evaluated = ask(ALICE, DOCUMENT + "Q2")      # control: the same key reuses its prefix
        assert reused > len(DOCUMENT) and evaluated == n - reused
        assert reused % BLOCK and cached == reused // BLOCK * BLOCK     # told in whole blocks, not to the token
        n, cached, reused, evaluated = ask(BOB, DOCUMENT + "Q2")        # the same prompt from another key
        assert (cached, reused, evaluated) == (0, 0, n)                 # the full prefill
        n, cached, reused, evaluated = ask(BOB, DOCUMENT + "Q3")        # Bob's own prefix is his to reuse
        assert reused > len(DOCUMENT) and cached == reused // BLOCK * BLOCK


def test_another_keys_busy_slot_is_never_copied() -> None:
    engine = FakeEngine(n_ctx=16384, n_seq=2, step_delay_s=0.004,
                        responder=lambda p: "a long reply, " * 12 if p.endswith("stream") else "ok")
    with LiveServer(engine, ServeOptions(api_keys=(ALICE, BOB))) as live:
        ask = Asker(live)
        ask(ALICE, DOCUMENT + "Q1")
        stream = iter(live.client(api_key=ALICE).completions.create(model="fake-model", prompt=DOCUMENT + "stream",
                                                                    stream=True))
        next(stream)                  # Alice's slot is busy generating: the other slot is free
        n, cached, reused, evaluated = ask(BOB, DOCUMENT + "Q2")
        assert (cached, reused, evaluated) == (0, 0, n)
        # control: Alice's own request beside her busy slot starts from a copy of it (into the slot Bob used)
        n, cached, reused, evaluated = ask(ALICE, DOCUMENT + "Q3")
        assert reused > len(DOCUMENT) and evaluated == n - reused and cached == reused // BLOCK * BLOCK
        for _ in stream:
            pass


def test_a_disk_cache_file_is_restored_only_for_the_key_that_wrote_it(tmp_path: Path) -> None:
    options = ServeOptions(api_keys=(ALICE, BOB), cache_dir=tmp_path / "cache", cache_min_tokens=256)

    def server() -> LiveServer:
        return LiveServer(FakeEngine(n_ctx=8192, n_seq=1, responder=lambda _: "ok"), options)

    with server() as live:
        Asker(live)(ALICE, DOCUMENT + "Q1")
        assert wait_for(lambda: Asker(live).seen()["lcrun_cache_saved_prompts_total"] == 1)
    with server() as live:            # after a restart: only the disk holds Alice's prefix
        ask = Asker(live)
        n, cached, reused, evaluated = ask(BOB, DOCUMENT + "Q2")
        assert (cached, reused, evaluated) == (0, 0, n)
        assert ask.seen()["lcrun_cache_restored_tokens_total"] == 0
    with server() as live:
        ask = Asker(live)
        n, cached, reused, evaluated = ask(ALICE, DOCUMENT + "Q2")      # control: her own file is restored
        assert ask.seen()["lcrun_cache_restored_tokens_total"] == reused >= len(DOCUMENT) // 256 * 256
        assert evaluated == n - reused


def test_a_remembered_reply_keeps_its_tokens_only_for_its_key() -> None:
    # a reply sampled with a control token comes back as text, which tokenizes otherwise (as characters): the server
    # remembers its sampled tokens, and a prompt's token count would tell another key that this reply was given
    engine = FakeEngine(n_ctx=8192, n_seq=2, reply_specials=True, responder=lambda _: "odd <|start_header_id|> one")
    with LiveServer(engine, ServeOptions(api_keys=(ALICE, BOB))) as live:
        question = [{"role": "user", "content": "Q1"}]
        reply = live.client(api_key=ALICE).chat.completions.create(model="fake-model", messages=question)
        follow = [*question, {"role": "assistant", "content": reply.choices[0].message.content},
                  {"role": "user", "content": "Q2"}]
        counts = {key: live.client(api_key=key).chat.completions.create(model="fake-model", messages=follow)
                  .usage.prompt_tokens for key in (ALICE, BOB)}
        assert counts[BOB] == counts[ALICE] + len("<|start_header_id|>") - 1   # Bob's: the text's own tokens
