"""`lcrun chat -f` and the documents' commands through the real CLI with the fake engine standing in for llama.cpp
(the model file, the plan and the token counts before loading are real): /add, /docs and /drop in the interactive
chat, documents kept before the conversation, a failed read changing nothing, stdin as either the prompt or a
document, -p's wait including the documents' prefill, a --session's context kept, and the prefill time at the speed
`lcrun bench` measured."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lcrun.prefill_speed import PrefillSpeed
from tests.fixtures.cli import assert_one_line_error, invoke
from tests.fixtures.documents import pdf_pages, sentence
from tests.fixtures.engines import Engines


@pytest.fixture(scope="module")
def model(demo_gguf_file: Path) -> Path:
    return demo_gguf_file


def chat(*args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
    return invoke("chat", *args, stdin=stdin)


def test_add_docs_and_drop_keep_the_documents_before_the_conversation(model: Path, engines: Engines,
                                                                     tmp_path: Path) -> None:
    first = tmp_path / "first.txt"
    first.write_text("alpha beta gamma")
    pdf = pdf_pages(tmp_path / "second.pdf", [[sentence(1)], [sentence(2)]])
    script = "\n".join(["hello", f"/add {pdf}", "/docs", f"/add {tmp_path / 'missing.pdf'}", "/docs", "/drop 1",
                        "/docs", "/drop 7", "/drop x", "bye"]) + "\n"
    result = chat(str(model), "-f", str(first), "--no-history", "-t", "1", stdin=script)
    out = result.stdout
    assert result.exit_code == 0, result.output
    assert f"{first} " in out and "first.txt added: " in out                     # the table, then the prefill
    assert "second.pdf: pdf, 2 pages, " in out and "second.pdf added: " in out
    listing = re.findall(r"^ +(\d)\. (\S+) — (.+) — ([\d,]+) tokens$", out, re.M)
    assert [(n, name, about) for n, name, about, _ in listing[:2]] == [("1", "first.txt", "text"),
                                                                       ("2", "second.pdf", "pdf, 2 pages")]
    assert listing[:2] == listing[2:4]                 # the read that failed changed nothing
    assert f"error: {tmp_path / 'missing.pdf'}: no such file or folder" in out
    assert "dropped first.txt (" in out and listing[4][:3] == ("1", "second.pdf", "pdf, 2 pages")
    assert "error: /drop: no document 7 (the documents are 1 to 1" in out and "error: /drop: needs the number" in out
    # the prompt the engine holds: system-less, the PDF (the one document left) first, then the turns in order
    prompt = engines[0].detokenize(engines[0].cached_tokens)
    assert "first.txt" not in prompt and prompt.index("second.pdf") < prompt.index("hello") < prompt.index("bye")


def test_a_document_the_running_chat_cannot_hold_gets_the_fix(model: Path, engines: Engines, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("word " * 180)   # the fake engine: a token a character, about 940 with its tag
    result = chat(str(model), "-c", "1k", "--no-history", "-t", "1", stdin=f"/add {big}\n/docs\n")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("error: "))
    assert line.startswith(f"error: {big}: ") and "the 1,024-token context cannot hold it" in line
    assert "; to hold it, start again: needs -c 2k (" in line and "+ 1,024 for the answer): " in line
    assert line.endswith("— fits with -c 2k") and "no documents" in result.stdout   # nothing was added


def test_stdin_is_the_prompt_or_a_document_not_both(model: Path, engines: Engines, tmp_path: Path) -> None:
    both = chat(str(model), "-p", "-", "-f", "-", stdin="text")
    assert_one_line_error(both, "-f -: standard input is already the prompt (-p -)")
    interactive = chat(str(model), "-f", "-", stdin="text")
    assert_one_line_error(interactive, "-f -: standard input is the interactive chat's")
    assert engines == []
    piped = chat(str(model), "-f", "-", "-p", "What is piped?", "--no-history", "-t", "1",
                 stdin="The piped secret is 42.")
    assert piped.exit_code == 0, piped.output
    prompt = engines[0].detokenize(engines[0].cached_tokens)
    assert '<document name="stdin">\nThe piped secret is 42.\n</document>' in prompt


def test_one_shot_counts_the_documents_prefill_in_the_wait(model: Path, engines: Engines, tmp_path: Path) -> None:
    doc = tmp_path / "long.txt"
    doc.write_text("x" * 1500)   # the fake engine: a token a character, three 512-token prefill steps
    engines.settings["step_delay_s"] = 0.05
    result = chat(str(model), "-f", str(doc), "-p", "hi", "-n", "8", "--no-history", "-t", "1")
    assert result.exit_code == 0, result.output
    took = re.search(r"time to first token ([\d.]+) s \(the documents' ([\d,]+) tokens took ([\d.]+) s of it\)",
                     result.stderr)
    assert took, result.stderr
    wait, tokens, documents = float(took[1]), int(took[2].replace(",", "")), float(took[3])
    assert tokens > 1500 and documents >= 3 * 0.05 and wait >= documents + 0.05   # and the question's own step


def test_a_session_keeps_its_context_and_its_documents_once(model: Path, engines: Engines, tmp_path: Path) -> None:
    doc, session = tmp_path / "doc.txt", tmp_path / "s.json"
    doc.write_text("The secret is 42. " * 10)
    common = ["--no-history", "-t", "1", "--session", str(session)]
    assert chat(str(model), "-f", str(doc), "-p", "first?", "-n", "8", *common).exit_code == 0
    again = chat(str(model), "-p", "second?", *common)           # no -f, no -c: the saved context, not the largest
    assert again.exit_code == 0, again.output
    assert engines.configs[1].n_ctx == engines.configs[0].n_ctx < 2048
    restored = int(re.search(r"([\d,]+) tokens of KV cache restored", again.stderr)[1].replace(",", ""))  # type: ignore[index]
    assert restored > 0 and "(0 reused)" not in again.stderr
    third = chat(str(model), "-f", str(doc), "-p", "third?", *common)
    assert third.exit_code == 0, third.output
    assert f"{doc}: already in the session (not added again)" in third.stderr
    prompt = engines[2].detokenize(engines[2].cached_tokens)
    assert prompt.count('<document name="doc.txt">') == 1


def test_the_prefill_column_appears_once_bench_measured_these_settings(model: Path, engines: Engines,
                                                                       tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(sentence(i) for i in range(10)))

    def columns(stdout: str) -> list[str]:
        return next(line for line in stdout.splitlines() if line.startswith("document")).split()

    before = chat(str(model), "-f", str(doc), "--dry-run", "-t", "1")
    assert before.exit_code == 0 and columns(before.stdout)[-1] == "tokens" and "lcrun bench" not in before.stdout
    bench = invoke("bench", str(model), "--depth", "0", "--depth", "256", "--pp", "64", "--tg", "0", "-r", "1",
                   "-t", "1")
    assert bench.exit_code == 0, bench.output
    assert "prefill speeds kept for lcrun chat's document estimates" in bench.stderr
    after = chat(str(model), "-f", str(doc), "--dry-run", "-t", "1")
    assert columns(after.stdout)[-1] == "prefill" and "as `lcrun bench` measured it with these settings" in after.stdout
    other = chat(str(model), "-f", str(doc), "--dry-run", "-t", "2")   # other settings: no figure borrowed
    assert other.exit_code == 0 and columns(other.stdout)[-1] == "tokens"


def test_prefill_time_integrates_the_time_per_token_over_depth() -> None:
    # bench measured 100 tok/s at depth 0 and 50 tok/s at depth 1000 (512-token measurements, at their middles)
    speed = PrefillSpeed(((256, 1 / 100), (1256, 1 / 50)))
    per_token = [speed._per_token(d + 0.5) for d in range(3000)]   # midpoint sum: an independent integral
    for start, end in ((0, 100), (0, 3000), (500, 2000), (2000, 3000)):
        assert speed.seconds(start, end) == pytest.approx(sum(per_token[start:end]), rel=1e-6)
    assert speed.seconds(0, 256) == pytest.approx(2.56)                          # before the first: its rate
    assert speed.seconds(2256, 2257) == pytest.approx(1 / 50 + 1 / 100, rel=1e-3)  # past the deepest: slope goes on
    assert PrefillSpeed(((256, 0.01),)).seconds(0, 5000) == pytest.approx(50.0)     # one depth: constant


def test_the_session_takes_the_counted_documents_only_from_the_same_vocabulary() -> None:
    from lcrun.chat.prompt_tokens import PromptTokenizer, as_content
    from tests.fixtures.fake_engine import FakeEngine

    engine, text = FakeEngine(), as_content("w" * 2000)   # a message's content, as the session tokenizes it
    calls: list[str] = []

    def tokenize(t: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        calls.append(t)
        return engine.tokenize(t, special=special, add_bos=add_bos)

    counted = PromptTokenizer(engine.tokenize, engine.token_text)
    counted(text)
    session = PromptTokenizer(tokenize, engine.token_text)
    assert session.learn(counted.fragments()) and calls == ["w" * 2000]    # one probe of the shortest
    assert session(text) == engine.tokenize("w" * 2000) and len(calls) == 1   # not tokenized again
    other = PromptTokenizer(lambda t, **_: [7] * len(t), engine.token_text)   # another vocabulary's tokens
    other(text)
    fresh = PromptTokenizer(tokenize, engine.token_text)
    assert not fresh.learn(other.fragments()) and fresh(text) == engine.tokenize("w" * 2000)
