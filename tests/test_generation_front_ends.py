"""Stop strings, a UTF-8 character split across tokens and max_tokens behave the same in `lcrun chat -p` and in
`lcrun serve` — both generate through lcrun.generation's one decode loop — on a real GGUF run by llama.cpp whose greedy
reply is a known script (tests/fixtures/scripted_gguf.py): "Caf", the two bytes of "é" as two tokens, " au lait",
" STOP", " more", then <|eot_id|>. The expected texts are written out here, not computed."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lcrun.engine.runtime import Engine, EngineConfig
from tests.fixtures.cli import invoke
from tests.fixtures.scripted_gguf import ScriptedModel, write_scripted_gguf
from tests.fixtures.serve_support import LiveServer

SCRIPT: list[str | bytes] = ["Caf", b"\xc3", b"\xa9", " au lait", " STOP", " more"]
QUESTION = "Hi"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> ScriptedModel:
    return write_scripted_gguf(tmp_path_factory.mktemp("scripted"), SCRIPT)


@pytest.fixture(scope="module")
def server(scripted: ScriptedModel) -> Iterator[LiveServer]:
    engine = Engine(EngineConfig(model_path=scripted.path, n_ctx=512, n_threads=1, flash_attn=False))
    try:
        with LiveServer(engine) as live:
            yield live
    finally:
        engine.close()


def through_chat(scripted: ScriptedModel, max_tokens: int | None, stop: list[str]) -> tuple[str, str]:
    args = ["chat", str(scripted.path), "-p", QUESTION, "--temp", "0", "--threads", "1", "--ctx", "512",
            "--no-history"]
    if max_tokens is not None:
        args += ["--max-tokens", str(max_tokens)]
    for text in stop:
        args += ["--stop", text]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    return result.stdout[:-1], result.stderr.rsplit("ended by ", 1)[1].strip()


def through_serve(server: LiveServer, max_tokens: int | None, stop: list[str]) -> tuple[str, str]:
    extra = {"max_tokens": max_tokens} if max_tokens is not None else {}
    out = server.client().chat.completions.create(model="fake-model", messages=[{"role": "user", "content": QUESTION}],
                                                  temperature=0, stop=stop or None, **extra)
    return out.choices[0].message.content, out.choices[0].finish_reason


def caf(scripted: ScriptedModel) -> int:
    """Tokens of "Caf" at the start of the reply."""
    return next(i for i, piece in enumerate(scripted.pieces) if piece == b"\xc3")


CASES = {
    # (max_tokens: None, or a function of the model giving it; stop strings) → (text, finish reason)
    "the whole reply": ((None, []), ("Café au lait STOP more", "stop")),
    "a stop string": ((None, ["STOP"]), ("Café au lait ", "stop")),
    "a stop string that never comes (control)": ((None, ["zzz", "STOPS"]), ("Café au lait STOP more", "stop")),
    "a stop string ending inside the split character": ((None, ["fé"]), ("Ca", "stop")),
    "max_tokens inside the split character": ((lambda m: caf(m) + 1, []), ("Caf\ufffd", "length")),
    "max_tokens right after it": ((lambda m: caf(m) + 2, []), ("Café", "length")),
}


@pytest.mark.parametrize("front_end", ["chat", "serve"])
@pytest.mark.parametrize("case", list(CASES))
def test_chat_and_serve_end_replies_alike(case: str, front_end: str, scripted: ScriptedModel,
                                          request: pytest.FixtureRequest) -> None:
    (limit, stop), expected = CASES[case]
    max_tokens = limit(scripted) if callable(limit) else limit
    if front_end == "chat":
        got = through_chat(scripted, max_tokens, stop)
    else:
        got = through_serve(request.getfixturevalue("server"), max_tokens, stop)
    assert got == expected


def test_the_script_splits_the_character_across_two_tokens(scripted: ScriptedModel) -> None:
    """What the cases above rely on: é is two tokens of the reply, each one byte, neither valid UTF-8 alone."""
    i = caf(scripted)
    assert scripted.pieces[i: i + 2] == [b"\xc3", b"\xa9"]
    with Engine(EngineConfig(model_path=scripted.path, n_ctx=256, n_threads=1)) as engine:
        assert [engine.token_bytes(t) for t in scripted.reply[i: i + 2]] == [b"\xc3", b"\xa9"]


GRAMMAR = 'root ::= "Café au lait"'   # the script's first words, then nothing but the end


@pytest.mark.parametrize("front_end", ["chat", "serve"])
def test_chat_and_serve_hold_a_reply_to_a_grammar_alike(front_end: str, scripted: ScriptedModel,
                                                        request: pytest.FixtureRequest) -> None:
    """The grammar lives in the one loop: both front ends end the script where the grammar ends it (greedy would go
    on with " STOP more": the control is the first case above, "the whole reply")."""
    if front_end == "chat":
        result = invoke("chat", str(scripted.path), "-p", QUESTION, "--temp", "0", "--threads", "1", "--ctx", "512",
                        "--no-history", "--grammar", GRAMMAR)
        assert result.exit_code == 0, result.output
        got = (result.stdout[:-1], result.stderr.rsplit("ended by ", 1)[1].strip())
    else:
        out = request.getfixturevalue("server").client().chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": QUESTION}], temperature=0,
            extra_body={"grammar": GRAMMAR})
        got = (out.choices[0].message.content, out.choices[0].finish_reason)
    assert got == ("Café au lait", "stop")
