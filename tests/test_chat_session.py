"""ChatSession with the fake engine: prefix reuse, overflow (oldest turns go, never the system prompt or a document),
documents, retry, usage, files and the history."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from lcrun.chat.history import History
from lcrun.chat.prompt_tokens import unmark
from lcrun.chat.session import ChatSession, ContextFull, Notice, TurnStarted
from lcrun.documents import Document, read_document
from lcrun.engine.protocol import Sampling
from lcrun.errors import DocumentError, LcrunError
from lcrun.generation.records import Finished, GenerationParams, PrefillProgress, TextChunk
from tests.fixtures.fake_engine import FakeEngine


def read(path: Path) -> Document:
    return read_document(str(path))


def turn(session: ChatSession, text: str, cancel: threading.Event | None = None) -> tuple[str, Finished, list]:
    events = list(session.ask(text, cancel))
    fin = events[-1]
    assert isinstance(fin, Finished)
    return "".join(e.text for e in events if isinstance(e, TextChunk)), fin, events


def test_follow_up_evaluates_only_the_new_tokens() -> None:
    engine = FakeEngine()
    session = ChatSession(engine, system="Be brief.")
    reply, first, _ = turn(session, "hello")
    assert reply == "You said: hello" and first.reused_tokens == 0
    cached = engine.cached_tokens
    # the prompt and the reply; its <|eot_id|> was sampled, never decoded (nothing would read its logits)
    assert engine.detokenize(cached).endswith("You said: hello") and first.tokens[-1] == engine.special_tokens()["eot"]
    _, second, _ = turn(session, "again")
    # everything cached is reused; only the <|eot_id|> and the new user message are evaluated
    assert second.reused_tokens == len(cached)
    new_part = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nagain<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert engine.calls[-1].evaluated_tokens == len(engine.tokenize(new_part))


def test_overflow_drops_oldest_turns_but_never_system_or_documents(tmp_path: Path) -> None:
    engine = FakeEngine(n_ctx=700)
    session = ChatSession(engine, system="SYSTEM", params=GenerationParams(max_tokens=40))
    doc = tmp_path / "doc.txt"
    doc.write_text("D" * 150)
    list(session.add_document(session.check_document(read(doc))))
    notices = []
    for i in range(12):
        _, fin, events = turn(session, f"question number {i} " + "x" * 20)
        notices += [e for e in events if isinstance(e, Notice)]
        assert fin.prompt_tokens + 40 <= 700
    assert any("dropped the" in n.text for n in notices)
    prompt = session.conversation.render(session.template)
    assert "SYSTEM" in prompt and "D" * 150 in prompt
    assert "question number 0 " not in prompt and "question number 11 " in prompt
    assert session.stats.dropped_turns >= 1


def test_a_message_too_large_for_the_context_is_refused_and_nothing_changes() -> None:
    engine = FakeEngine(n_ctx=300)
    session = ChatSession(engine, params=GenerationParams(max_tokens=20))
    turn(session, "short")
    before = list(session.conversation.messages)
    with pytest.raises(ContextFull, match="tokens with the system prompt"):
        list(session.ask("y" * 400))
    assert session.conversation.messages == before
    reply, _, _ = turn(session, "still here")  # the session goes on
    assert reply == "You said: still here"


def test_document_check_counts_tokens_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    session = ChatSession(FakeEngine(n_ctx=500), params=GenerationParams(max_tokens=50))
    small, big, binary = tmp_path / "small.txt", tmp_path / "big.txt", tmp_path / "x.bin"
    small.write_text("abc " * 20)
    big.write_text("z" * 1000)
    binary.write_bytes(b"\x7fELF\x00\x01\x02")
    check = session.check_document(read(small))
    # what it adds to the prompt: its header, the text in its <document> wrapper, the end of the message (the BOS
    # is there before any message: the vocabulary adds it to every prompt, as llama-server does)
    message = '<|start_header_id|>user<|end_header_id|>\n\n<document name="small.txt">\n' + \
        ("abc " * 20).strip() + "\n</document><|eot_id|>"
    assert check.tokens == len(session.engine.tokenize(message))
    assert check.drops_turns == 0 and not session.conversation.messages  # checking adds nothing
    with pytest.raises(DocumentError, match="big.txt: 1,0[0-9][0-9] tokens; the 500-token context cannot hold it"):
        session.check_document(read(big))
    with pytest.raises(DocumentError, match="x.bin: a binary file"):
        read(binary)
    with pytest.raises(DocumentError, match="nothere.txt: no such file"):
        read(tmp_path / "nothere.txt")


def test_document_is_prefilled_when_added_and_cancel_undoes_it(tmp_path: Path) -> None:
    engine = FakeEngine()
    session = ChatSession(engine)
    doc = tmp_path / "d.txt"
    doc.write_text("w" * 1500)
    cancel = threading.Event()
    check = session.check_document(read(doc))
    events = []
    for event in session.add_document(check, cancel):
        events.append(event)
        if isinstance(event, PrefillProgress):
            cancel.set()
    assert any(isinstance(e, Notice) and "was not added" in e.text for e in events)
    assert session.conversation.messages == []
    events = list(session.add_document(check))
    assert [m.document for m in session.conversation.messages] == ["d.txt"]
    prefilled = len(engine.cached_tokens)
    assert prefilled >= 1500
    _, fin, _ = turn(session, "what is in it?")
    assert fin.reused_tokens == prefilled  # the whole document came from the cache
    assert fin.prompt_tokens - fin.reused_tokens < 60  # only the question was evaluated


def test_cancelled_reply_is_kept_as_interrupted_and_recorded(tmp_path: Path) -> None:
    cancel = threading.Event()
    engine = FakeEngine(on_token=lambda i: cancel.set() if i == 3 else None)  # the 4th token is the last
    history = History(tmp_path / "h.jsonl")
    session = ChatSession(engine, history=history)
    reply, fin, _ = turn(session, "a long question", cancel)
    assert fin.reason == "cancelled" and reply == "You "
    assert session.conversation.messages[-1].interrupted
    record = list(history.records())[-1]
    assert record["finish_reason"] == "cancelled" and record["assistant"] == "You "


def test_cancel_before_the_first_token_forgets_the_question() -> None:
    cancel = threading.Event()
    cancel.set()
    session = ChatSession(FakeEngine())
    events = list(session.ask("never mind", cancel))
    assert isinstance(events[-1], Notice) and session.conversation.messages == []
    turn(session, "keep me")
    events = list(session.retry(cancel))  # a cancelled /retry keeps the question it was answering
    assert isinstance(events[-1], Notice) and [m.content for m in session.conversation.messages] == ["keep me"]


def test_retry_regenerates_the_last_answer_with_a_new_seed_when_sampling() -> None:
    engine = FakeEngine()
    session = ChatSession(engine, params=GenerationParams(Sampling(temperature=0.8, seed=7)))
    turn(session, "q1")
    events = list(session.retry())
    assert [m.role for m in session.conversation.messages] == ["user", "assistant"]
    assert engine.calls[-1].sampling.seed == 8
    assert any(isinstance(e, TurnStarted) for e in events)
    with pytest.raises(LcrunError, match="no question"):
        list(ChatSession(FakeEngine()).retry())


def test_usage_breaks_the_context_down(tmp_path: Path) -> None:
    engine = FakeEngine()
    session = ChatSession(engine, system="S" * 30)
    doc = tmp_path / "notes.txt"
    doc.write_text("n" * 200)
    list(session.add_document(session.check_document(read(doc))))
    turn(session, "hi")
    usage = session.usage()
    assert usage.system >= 30 and usage.documents[0][0] == "notes.txt" and usage.documents[0][1] > 200
    assert usage.n_turns == 1 and usage.turns > 0
    assert usage.prompt == len(engine.tokenize(unmark(session.conversation.render(session.template))))
    assert usage.system + sum(n for _, n in usage.documents) + usage.turns + usage.reply_header == usage.prompt
    assert usage.reply_header == len(engine.tokenize("<|start_header_id|>assistant<|end_header_id|>\n\n"))
    assert usage.cached == len(engine.cached_tokens)
    assert usage.free == usage.n_ctx - usage.prompt


def test_save_and_load_roundtrip_and_bad_files(tmp_path: Path) -> None:
    session = ChatSession(FakeEngine(), system="sys")
    turn(session, "remember me")
    path = tmp_path / "chat.json"
    session.save(path)
    assert not list(tmp_path.glob("chat.json*.partial"))  # partials are named by their writer
    other = ChatSession(FakeEngine())
    other.load(path)
    assert other.conversation == session.conversation
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LcrunError, match="bad.json: not a saved chat"):
        other.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"messages": []}))
    with pytest.raises(LcrunError, match="not an lcrun chat file"):
        other.load(tmp_path / "other.json")
    assert other.conversation == session.conversation  # a failed load changes nothing


def test_history_appends_one_line_per_turn_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    history = History(path)
    session = ChatSession(FakeEngine(), history=history)
    turn(session, "one")
    with open(path, "ab") as f:
        f.write(b'{"user": "torn by a cra')  # what kill -9 in the middle of a write would leave
    turn(session, "two")
    assert [r["user"] for r in history.records()] == ["one", "two"]
    lines = path.read_bytes().split(b"\n")
    assert len([line for line in lines if line]) == 3  # two records and the torn line, each on its own line


def test_a_template_that_refuses_the_conversation_leaves_it_unchanged() -> None:
    picky = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no: ' + m['content']) }}"
             "{% endif %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
             "{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")
    session = ChatSession(FakeEngine(chat_template=picky))
    with pytest.raises(LcrunError, match="no: forbidden word"):
        list(session.ask("forbidden word"))
    assert session.conversation.messages == []
    reply, _, _ = turn(session, "fine")
    assert reply == "You said: fine"
