"""`lcrun chat` transcripts through click's CliRunner with the fake engine standing in for llama.cpp (the model file
and the plan are real): one-shot mode, the commands, overflow, Ctrl-C, the history, sessions and bad input."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from lcrun.convert.convert import convert_checkpoint
from lcrun.models import demo_checkpoint
from tests.fixtures.cli import invoke
from tests.fixtures.engines import Engines


@pytest.fixture(scope="module")
def model(demo_gguf_file: Path) -> Path:
    return demo_gguf_file


def run(args: list[str], stdin: str | None = None):  # type: ignore[no-untyped-def]
    """`lcrun chat ARGS` through lcrun's real entry point; every engine it makes is a FakeEngine sized by the real
    plan (the `engines` fixture)."""
    return invoke("chat", *args, stdin=stdin)


def test_one_shot_prints_only_the_answer_on_stdout(model: Path, engines: Engines, tmp_path: Path) -> None:
    hist = tmp_path / "h.jsonl"
    result = run([str(model), "-p", "What is 2+2?", "--history", str(hist)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "You said: What is 2+2?\n"
    assert "prompt tokens" in result.stderr and "generated" in result.stderr
    assert [r["user"] for r in map(json.loads, hist.read_text().splitlines())] == ["What is 2+2?"]


def test_one_shot_reads_the_prompt_from_stdin_and_adds_files(model: Path, engines: Engines,
                                                             tmp_path: Path) -> None:
    doc = tmp_path / "notes.txt"
    doc.write_text("The secret is 42.")
    result = run([str(model), "-p", "-", "--file", str(doc), "--no-history"], stdin="Summarise\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "You said: Summarise\n"
    prompt = engines[0].detokenize(engines[0].cached_tokens)
    assert '<document name="notes.txt">\nThe secret is 42.\n</document>' in prompt
    assert f"{doc} " in result.stderr and "notes.txt added: " in result.stderr   # the table, then the prefill


def test_interactive_transcript_of_the_commands(model: Path, engines: Engines, tmp_path: Path) -> None:
    doc, saved = tmp_path / "doc.txt", tmp_path / "conv.json"
    doc.write_text("alpha beta gamma")
    script = "\n".join([
        "/help", "hello", "/system Answer in French.", f"/file {doc}", "what is in it?", "/ctx", "/stats",
        f"/save {saved}", "/clear", "/ctx", f"/load {saved}", "/retry", "/nonsense", "//literal slash", "/quit",
        "never read",
    ]) + "\n"
    result = run([str(model), "--history", str(tmp_path / "h.jsonl")], stdin=script)
    out = result.stdout
    assert result.exit_code == 0, out
    assert "context 2,048 tokens" in out                                   # the plan panel, before loading
    assert "/add PATH" in out and "/drop N" in out and "/retry" in out     # /help
    assert "You said: hello" in out
    assert "system prompt set (" in out
    assert "doc.txt: " in out and "fits" in out and "doc.txt added" in out
    assert "You said: what is in it?" in out
    assert "document doc.txt" in out and "prompt now" in out and "free" in out   # /ctx
    assert "last turn:" in out and "session: 2 turn(s)" in out             # /stats
    assert f"saved 5 message(s) to {saved}" in out
    assert "conversation cleared" in out and f"loaded 5 message(s) from {saved}" in out
    assert out.count("You said: what is in it?") == 2                      # /retry answered again
    assert "error: /nonsense: no such command" in out
    assert "You said: /literal slash" in out
    assert "never read" not in out
    records = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [r["user"] for r in records] == ["hello", "what is in it?", "what is in it?", "/literal slash"]
    assert records[1]["documents"] == ["doc.txt"] and records[1]["system"] == "Answer in French."


def test_multi_line_input(model: Path, engines: Engines) -> None:
    result = run([str(model), "--no-history"], stdin='first line \\\nsecond line\n"""\nblock one\nblock two\n"""\n')
    assert "You said: first line \nsecond line" in result.stdout
    assert "You said: block one\nblock two" in result.stdout


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(model: Path, engines: Engines,
                                                         tmp_path: Path) -> None:
    # Ctrl-C while the 6th token is sampled: the reply ends after it
    engines.settings["on_token"] = lambda i: os.kill(os.getpid(), signal.SIGINT) if i == 5 else None
    hist = tmp_path / "h.jsonl"
    result = run([str(model), "--history", str(hist)], stdin="first\nsecond\n")
    assert result.exit_code == 0, result.output
    assert "You sa\n" in result.stdout and "stopped" in result.stdout     # cut after 6 tokens, said so
    records = [json.loads(line) for line in hist.read_text().splitlines()]
    assert [(r["user"], r["finish_reason"]) for r in records] == [("first", "cancelled"), ("second", "cancelled")]
    assert records[0]["assistant"] == "You sa"


def test_overflow_drops_the_oldest_turns_and_says_so(model: Path, engines: Engines) -> None:
    questions = [f"question {i}: " + "x" * 300 for i in range(8)]
    result = run([str(model), "--no-history", "--ctx", "1024", "--max-tokens", "64", "--system", "KEEP"],
                 stdin="\n".join(questions) + "\n")
    assert result.exit_code == 0, result.output
    assert "context full: dropped the" in result.stdout
    prompt = engines[0].detokenize(engines[0].cached_tokens)
    assert "KEEP" in prompt and "question 0:" not in prompt and "question 7:" in prompt


def test_bad_files_in_the_session_are_one_line_and_the_session_goes_on(model: Path, engines: Engines,
                                                                      tmp_path: Path) -> None:
    binary, big = tmp_path / "blob.bin", tmp_path / "big.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    big.write_text("word " * 5000)
    unreadable = tmp_path / "secret.txt"
    unreadable.write_text("x")
    unreadable.chmod(0)
    script = f"/file {binary}\n/file {big}\n/file {tmp_path / 'missing.txt'}\n/file {unreadable}\n/load {binary}\nstill alive\n"
    result = run([str(model), "--no-history"], stdin=script)
    out = result.stdout
    assert f"error: {binary}: a binary file" in out
    assert f"error: {big}: " in out and "cannot hold it" in out
    assert f"error: {tmp_path / 'missing.txt'}: no such file" in out
    if os.geteuid() != 0:  # root reads anything
        assert f"error: {unreadable}: not readable" in out
    assert f"error: {binary}: not a saved chat" in out
    assert "You said: still alive" in out
    assert "Traceback" not in result.output


def test_session_file_restores_conversation_and_kv_cache(model: Path, engines: Engines,
                                                         tmp_path: Path) -> None:
    session = tmp_path / "s.chat"
    first = run([str(model), "--no-history", "--session", str(session)], stdin="remember this\n")
    assert first.exit_code == 0 and session.exists() and Path(str(session) + ".kv").exists()
    cached = engines[0].cached_tokens
    second = run([str(model), "--no-history", "--session", str(session)], stdin="and now?\n")
    assert f"{len(cached):,} tokens of KV cache restored" in second.stdout
    assert engines[1].calls[0].reused_tokens == len(cached)  # nothing prefilled twice
    assert "You said: and now?" in second.stdout


def test_a_session_of_another_model_keeps_its_conversation_but_not_its_kv_cache(model: Path, engines: Engines,
                                                                                 tmp_path: Path) -> None:
    """Issue 20, finding 13: llama.cpp takes the KV state of any model of the same architecture and size; the session
    file says which model wrote it, and another model's is refused in one line (the conversation is kept)."""
    other = convert_checkpoint(demo_checkpoint(), tmp_path / "other.gguf", outtype="f32").paths[0]
    session = tmp_path / "s.chat"
    assert run([str(model), "--no-history", "--session", str(session)], stdin="remember this\n").exit_code == 0
    second = run([str(other), "--no-history", "--session", str(session)], stdin="and now?\n")
    assert second.exit_code == 0
    warning = [line for line in second.stdout.splitlines() if "another model" in line]
    assert warning == [f"warning: s.chat: its KV cache was saved with another model ({model.name}); the conversation "
                       "will be prefilled again"], second.stdout
    assert "2 message(s), 0 tokens of KV cache restored" in second.stdout   # the conversation is kept
    assert engines[1].calls[0].reused_tokens == 0
    # saved again by the other model: now its own, and restored (the negative control)
    cached = engines[1].cached_tokens
    third = run([str(other), "--no-history", "--session", str(session)], stdin="")
    assert f"{len(cached):,} tokens of KV cache restored" in third.stdout and "another model" not in third.stdout


def test_stale_partial_session_files_are_cleaned(model: Path, engines: Engines, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from lcrun.process_files import process_tag

    session = tmp_path / "s.chat"
    assert run([str(model), "--no-history", "--session", str(session)], stdin="hi\n").exit_code == 0
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"s.chat.{process_tag(writer.pid)}.partial"
        dead = tmp_path / "s.chat.4000000-1.partial"
        kv_partial = tmp_path / "s.chat.kv.partial"   # llama.cpp's writer of the KV state names it so
        for path in (live, dead, kv_partial):
            path.write_bytes(b"half")
        os.utime(kv_partial, (time.time() - 7200, time.time() - 7200))
        assert run([str(model), "--no-history", "--session", str(session)], stdin="").exit_code == 0
        assert live.exists() and not dead.exists() and not kv_partial.exists()
    finally:
        writer.kill()
        writer.wait()


def test_dry_run_shows_the_plan_without_loading(model: Path, engines: Engines) -> None:
    result = run([str(model), "--dry-run", "--flash-attn", "off", "--rope-theta", "1e6"])
    assert result.exit_code == 0
    assert "flash attention off" in result.stdout and "--rope-theta 1e+06 overrides the file's RoPE base (500000)" in result.stdout
    assert engines == []


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope.gguf"], "{tmp}/nope.gguf: no such file"),
    (["{tmp}/corrupt.gguf"], "{tmp}/corrupt.gguf: "),
    (["{model}", "--ctx", "2048", "--ram", "1M"], "2,048 tokens do not fit"),
    (["{model}", "-p", "-"], "-p: the prompt is empty"),
    (["{model}", "-p", "hi", "--file", "{tmp}/nope.txt"], "{tmp}/nope.txt: no such file"),
    (["{model}", "--kv-type", "q8_0"], "head size is 16; use --kv-type f16"),
])
def test_bad_input_is_one_line_before_loading(model: Path, engines: Engines, tmp_path: Path,
                                              args: list[str], message: str) -> None:
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    result = run([a.format(tmp=tmp_path, model=model) for a in args], stdin="")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=tmp_path) in lines[0]
    assert engines == []


def test_hub_gguf_repo_is_downloaded_into_the_cache_then_chatted_with(model: Path, engines: Engines,
                                                                        fake_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doc = tmp_path / "q.txt"
    doc.write_text("a document")
    fake_hub.add_repo("someorg/tiny-GGUF", {"tiny-F16.gguf": model.read_bytes(), "README.md": b"# tiny"})
    result = run(["someorg/tiny-GGUF:F16", "--file", str(doc), "-p", "hi", "--no-history"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "You said: hi\n"
    assert fake_hub.bytes_served("tiny-F16.gguf") == model.stat().st_size
    cached = list((tmp_path / "hf-home" / "hub").rglob("tiny-F16.gguf"))
    assert len(cached) == 1 and cached[0].read_bytes() == model.read_bytes()
    only_one = run(["someorg/tiny-GGUF", "-p", "hi", "--no-history"])  # the repo's only GGUF needs no quant
    assert only_one.exit_code == 0, only_one.output
    named = run(["someorg/tiny-GGUF", "--hf-file", "tiny-F16.gguf", "-p", "hi", "--no-history"])
    assert named.exit_code == 0, named.output
    missing = run(["someorg/tiny-GGUF:Q4_K_M", "-p", "hi"])
    assert missing.exit_code == 1
    assert missing.stderr.strip() == "error: someorg/tiny-GGUF: has no Q4_K_M GGUF; it has F16"
    no_file = run(["someorg/tiny-GGUF", "--hf-file", "other.gguf", "-p", "hi"])
    assert no_file.exit_code == 1
    assert no_file.stderr.strip() == "error: someorg/tiny-GGUF: no file other.gguf in the repo; it has tiny-F16.gguf"
