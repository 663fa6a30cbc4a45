"""`lcrun serve` as a user runs it — a child process on 127.0.0.1 over a real tiny Llama GGUF through llama.cpp —
driven by the official OpenAI client: a served greedy answer equals `lcrun chat -p`, four concurrent requests answer
as each alone, the disk prompt cache survives a restart and restores a KV state that answers exactly as a fresh
evaluation, and Ctrl-C / SIGTERM stop it cleanly (exit 0) even mid-stream. Plus the command line's own checks."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.fixtures.cli import invoke
from tests.fixtures.serve_support import ServeProcess, metrics, wait_for

MAX = 24
QUESTION = "Tell me about foxes."
DOCUMENT = " ".join(f"Paragraph {i}: the river runs past the old mill and the fox sleeps in the barn." for i in range(40))


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> Path:
    return tiny_gguf


def chat(client: openai.OpenAI, content: str, **kw) -> openai.types.chat.ChatCompletion:  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model="tiny.gguf", messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=MAX, **kw)


def test_a_served_greedy_answer_equals_lcrun_chat_p(tiny: Path, tmp_path: Path) -> None:
    one_shot = subprocess.run([sys.executable, "-m", "lcrun.cli", "chat", str(tiny), "-p", QUESTION, "--temp", "0",
                               "--max-tokens", str(MAX), "--threads", "2", "--no-history"],
                              capture_output=True, text=True, timeout=120)
    assert one_shot.returncode == 0, one_shot.stderr
    expected = one_shot.stdout.removesuffix("\n")
    assert len(expected) > 10  # a real answer to compare, not an empty one
    with ServeProcess(str(tiny), "--threads", "2") as server:
        out = chat(server.client(), QUESTION)
        assert out.choices[0].message.content == expected
        streamed = server.client().chat.completions.create(
            model="tiny.gguf", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=MAX,
            stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
        # a different question answers differently (the comparison above could not pass by accident)
        assert chat(server.client(), "Something else entirely?").choices[0].message.content != expected
        code, _, err = server.stop()
    assert code == 0, err


def test_four_concurrent_requests_answer_as_each_alone(tiny: Path) -> None:
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(4)]
    with ServeProcess(str(tiny), "--threads", "2", "-np", "4") as server:
        client = server.client()
        alone = [chat(client, q).choices[0].message.content for q in questions]
        assert len(set(alone)) > 1
        together: dict[int, str | None] = {}

        def ask(i: int) -> None:
            together[i] = chat(client, questions[i]).choices[0].message.content

        # the KV caches hold these prompts now: clear the way so all four prefill and generate side by side
        for i, q in enumerate(questions):
            chat(client, f"Unrelated filler {i} " * 5)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [together[i] for i in range(4)] == alone
        seen = metrics(server.url)
        assert seen["lcrun_slots_total"] == 4 and seen["lcrun_slots_busy"] == 0
        code, _, err = server.stop()
    assert code == 0, err


def test_the_prompt_cache_survives_a_restart_and_restores_exact_state(tiny: Path, tmp_path: Path) -> None:
    cache = tmp_path / "prompts"
    args = (str(tiny), "--threads", "2", "--ctx", "2048", "--cache-dir", str(cache), "--cache-min-tokens", "256")
    follow_up = DOCUMENT + "\n\nWhich animal sleeps in the barn?"
    with ServeProcess(*args) as server:
        first = chat(server.client(), DOCUMENT + "\n\nWhat runs past the mill?")
        assert first.usage.prompt_tokens > 600 and first.usage.prompt_tokens_details.cached_tokens == 0
        assert wait_for(lambda: metrics(server.url)["lcrun_cache_saved_prompts_total"] == 1, 20)
        code, out, err = server.stop(signal.SIGINT)
    assert code == 0, err
    assert len(list(cache.glob("*.lcrunkv"))) == 1
    with ServeProcess(*args) as server:
        restored = chat(server.client(), follow_up)
        assert restored.usage.prompt_tokens_details.cached_tokens >= 512
        restored_tokens = metrics(server.url)["lcrun_cache_restored_tokens_total"]  # usage says it in 128s
        assert restored_tokens // 128 * 128 == restored.usage.prompt_tokens_details.cached_tokens
        server.stop()
    with ServeProcess(str(tiny), "--threads", "2", "--ctx", "2048") as server:  # no cache: evaluated from scratch
        fresh = chat(server.client(), follow_up)
        assert fresh.usage.prompt_tokens_details.cached_tokens == 0
        server.stop()
    assert restored.choices[0].message.content == fresh.choices[0].message.content


@pytest.mark.slow
def test_a_server_killed_while_it_writes_the_cache_leaves_only_whole_files(tmp_path: Path) -> None:
    """SIGKILL of `lcrun serve` caught mid-write of a prompt's state (a `.partial` seen, the process stopped there,
    then killed): after a restart the cache holds only whole files, and each one restores its prompt."""
    from tests.fixtures.tiny_gguf import write_tiny_gguf

    # 16 narrow layers: 4 KiB of state a token for little compute, so a prompt's file takes a while to write and sync
    model = write_tiny_gguf(tmp_path, "wide.gguf", hidden=64, heads=2, kv_heads=2, layers=16, ffn=128)
    cache = tmp_path / "prompts"
    args = (str(model), "--threads", "1", "--ctx", "4096", "--cache-dir", str(cache), "--cache-min-tokens", "256")
    prompts = [f"Copy {i}. " + DOCUMENT[:1000] for i in range(30)]     # 600 tokens each
    caught, asked = None, 1
    server = ServeProcess(*args)
    try:
        client = server.client()
        client.completions.create(model="wide.gguf", prompt=prompts[0], max_tokens=1)   # one file written whole
        assert wait_for(lambda: len(list(cache.glob("*.lcrunkv"))) == 1 and not list(cache.glob("*.partial")), 60)
        for prompt in prompts[1:]:
            asked += 1
            answers: list[object] = []

            def ask(p: str = prompt, answers: list[object] = answers) -> None:
                try:
                    answers.append(client.completions.create(model="wide.gguf", prompt=p, max_tokens=1))
                except openai.APIConnectionError as gone:   # the kill, mid-request
                    answers.append(gone)

            done = threading.Thread(target=ask)
            done.start()
            until = None
            while caught is None and (until is None or time.monotonic() < until):
                partial = next(cache.glob("*.partial"), None)
                if partial is not None:
                    server.proc.send_signal(signal.SIGSTOP)      # held mid-write
                    caught = partial if partial.exists() else None
                    if caught is None:
                        server.proc.send_signal(signal.SIGCONT)
                elif until is None and not done.is_alive():
                    assert answers, "the request failed"
                    until = time.monotonic() + 2.0               # its state is written after the reply
            if caught is not None:
                break
        assert caught is not None, "never saw a write in progress"
        server.proc.kill()
        server.proc.wait(30)
        done.join(30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(30)
    whole = sorted(cache.glob("*.lcrunkv"))
    assert caught.exists() and len(whole) < asked      # the killed write left its partial, never a file
    with ServeProcess(*args) as again:
        assert not caught.exists() and not list(cache.glob("*.partial"))   # its writer is gone: removed
        assert metrics(again.url)["lcrun_prompt_cache_files"] == len(whole) >= 1
        restored = 0.0
        for prompt in prompts[: len(whole)]:                  # each file left is whole: llama.cpp takes it back
            again.client().completions.create(model="wide.gguf", prompt=prompt + " Again.", max_tokens=1)
            now = metrics(again.url)["lcrun_cache_restored_tokens_total"]
            assert now > restored + 256
            restored = now
        code, _, err = again.stop()
    assert code == 0, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_mid_stream_stops_the_server_cleanly(tiny: Path, sig: int) -> None:
    with ServeProcess(str(tiny), "--threads", "2") as server:
        stream = server.client().chat.completions.create(
            model="tiny.gguf", messages=[{"role": "user", "content": QUESTION}], max_tokens=400, stream=True,
            extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        server.proc.send_signal(sig)
        ended = []
        try:
            for chunk in chunks:
                ended.append(chunk)
        except openai.APIError as exc:  # had the reply outlived the grace period, an error event would end it
            ended.append(exc)
        assert ended  # the reply went on after the signal
        # the one signal is enough: a second one could land after uvicorn has put the default handlers back
        code, out, err = server.wait()
    assert code == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_dry_run_shows_the_plan_and_what_each_slot_gets() -> None:
    result = invoke("serve", "demo", "--dry-run", "-np", "4", "--ctx", "2048")
    assert result.exit_code == 0, result.stderr
    assert "context 2,048 tokens" in result.stdout
    assert "4 slots · 512 tokens each (the 2,048-token context split 4 ways)" in result.stdout
    assert result.stderr == ""


def test_listening_beyond_loopback_without_a_key_warns() -> None:
    warned = invoke("serve", "demo", "--dry-run", "--host", "0.0.0.0")
    assert warned.exit_code == 0 and "without an API key" in warned.stderr
    keyed = invoke("serve", "demo", "--dry-run", "--host", "0.0.0.0", "--api-key", "k")
    assert keyed.exit_code == 0 and "without an API key" not in keyed.stderr


def test_a_busy_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = invoke("serve", "demo", "--port", str(port))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: 127.0.0.1:{port}: cannot listen there (Address already "
                                                  "in use)"]
