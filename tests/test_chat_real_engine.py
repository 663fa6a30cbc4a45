"""`lcrun chat` on a real tiny converted model through llama.cpp: greedy answers equal llama-cpp-python's own chat
completion (its own rendering of the GGUF's template), a follow-up that reuses the KV cache answers exactly as a fresh
evaluation of the whole conversation would, and a --session restores the cache so nothing is prefilled twice."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcrun.chat.session import ChatSession
from lcrun.engine.protocol import GREEDY
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.generation.records import GenerationParams, TextChunk
from tests.fixtures.cli import assert_one_line_error, invoke, run_lcrun

MAX = 24


@pytest.fixture(scope="module")
def tiny(tiny_gguf: Path) -> Path:
    return tiny_gguf


def direct_llama(path: Path, n_ctx: int):  # type: ignore[no-untyped-def]
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_batch=2048, n_ubatch=512,
                           flash_attn=True, yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0,
                           verbose=False)


def direct_greedy(llm, tokens: list[int], limit: int) -> list[int]:  # type: ignore[no-untyped-def]
    import llama_cpp

    out: list[int] = []
    llm.reset()
    for token in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        out.append(token)
        if len(out) == limit:
            break
    return out


def lcrun(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # a child process: llama.cpp's own output must not mix into the answer on stdout, end to end
    return run_lcrun("chat", *args, input=stdin, timeout=120)


def test_penalties_answer_as_llama_cpp_python_with_the_same_penalties(tiny: Path) -> None:
    question = [{"role": "user", "content": "Tell me about foxes."}]
    common = ["-p", "Tell me about foxes.", "--temp", "0", "--max-tokens", str(MAX), "--threads", "2", "--no-history"]
    penalised = lcrun(str(tiny), *common, "--presence-penalty", "1.5", "--frequency-penalty", "0.5")
    plain = lcrun(str(tiny), *common)
    assert penalised.returncode == plain.returncode == 0, penalised.stderr + plain.stderr
    assert penalised.stdout != plain.stdout   # the penalties take effect
    llm = direct_llama(tiny, 1024)
    try:
        theirs = llm.create_chat_completion(question, temperature=0.0, max_tokens=MAX, seed=0, presence_penalty=1.5,
                                            frequency_penalty=0.5)
    finally:
        llm.close()
    expected = theirs["choices"][0]["message"]["content"]
    # llama-cpp-python goes on past max_tokens while its text ends inside a UTF-8 character (random weights emit
    # such bytes): its answer may be a token or two longer
    ours = penalised.stdout.replace("\ufffd", "").removesuffix("\n")
    assert len(ours) > 10 and expected.startswith(ours)


def test_one_shot_answer_equals_llama_cpp_python_chat_completion(tiny: Path, tmp_path: Path) -> None:
    result = lcrun(str(tiny), "-p", "Tell me about foxes.", "--temp", "0", "--max-tokens", str(MAX),
                   "--threads", "2", "--history", str(tmp_path / "h.jsonl"))
    assert result.returncode == 0, result.stderr
    llm = direct_llama(tiny, 1024)
    try:
        theirs = llm.create_chat_completion([{"role": "user", "content": "Tell me about foxes."}], temperature=0.0,
                                            max_tokens=MAX, seed=0)
    finally:
        llm.close()
    expected = theirs["choices"][0]["message"]["content"]
    # random weights emit bytes that are not UTF-8: we show U+FFFD where llama-cpp-python drops them
    assert expected and result.stdout.replace("\ufffd", "") == expected + "\n"
    record = json.loads((tmp_path / "h.jsonl").read_text())
    assert record["assistant"].replace("\ufffd", "") == expected and record["completion_tokens"] >= 1
    assert "prompt tokens" in result.stderr


def test_follow_up_reuses_the_cache_and_answers_as_a_fresh_evaluation(tiny: Path) -> None:
    engine = Engine(EngineConfig(model_path=tiny, n_ctx=1024, n_threads=2, n_batch=2048, n_ubatch=512,
                                 flash_attn=False))  # the plan's choice on a CPU (no short-batch padding)
    try:
        session = ChatSession(engine, system="You are terse.", params=GenerationParams(GREEDY, max_tokens=MAX))
        list(session.ask("First question about the weather?"))
        cached = len(engine.cached_tokens)
        reply = session.conversation.messages[-1].content
        assert "\ufffd" in reply and reply == reply.strip()  # not UTF-8: re-tokenizing it cannot give the tokens back
        events = list(session.ask("And a second one?"))
        fin = events[-1]
        ours = "".join(e.text for e in events if isinstance(e, TextChunk))
        # everything cached is reused — the reply too, through the tokens the model sampled
        assert fin.reused_tokens == cached
        prompt = engine.cached_tokens[: fin.prompt_tokens]
    finally:
        engine.close()
    llm = direct_llama(tiny, 1024)
    try:
        fresh = direct_greedy(llm, prompt, fin.completion_tokens)
        assert llm.detokenize(fresh).decode("utf-8", errors="replace") == ours
    finally:
        llm.close()


def test_session_file_skips_the_document_prefill(tiny: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    session = tmp_path / "doc.session"
    common = ["--temp", "0", "--max-tokens", "8", "--threads", "2", "--no-history", "--ctx", "1024",
              "--session", str(session)]
    first = lcrun(str(tiny), "-p", "What is it about?", "--file", str(doc), *common)
    assert first.returncode == 0, first.stderr
    assert session.exists() and Path(str(session) + ".kv").stat().st_size > 0
    second = lcrun(str(tiny), "-p", "Anything else?", *common)
    assert second.returncode == 0, second.stderr
    restored = int(second.stderr.split(" tokens of KV cache restored")[0].rsplit(", ", 1)[1].replace(",", ""))
    reused = int(second.stderr.split(" reused)")[0].rsplit("(", 1)[1].replace(",", ""))
    first_prompt = int(first.stderr.split(" prompt tokens")[0].rsplit("\n", 1)[-1].replace(",", ""))
    assert first_prompt > 400 and restored > first_prompt
    assert reused >= first_prompt  # the document and the first question came back from the state file
    # a damaged state file is refused with a warning, and the chat still answers (prefilling again)
    kv = Path(str(session) + ".kv")
    kv.write_bytes(kv.read_bytes()[:1000])
    third = lcrun(str(tiny), "-p", "Again?", *common)
    assert third.returncode == 0, third.stderr
    assert "warning:" in third.stderr and "prefilled again" in third.stderr and "(0 reused)" in third.stderr


def test_prompt_tokenizer_equals_whole_tokenization_and_skips_known_fragments(tiny: Path) -> None:
    from lcrun.chat.prompt_tokens import PromptTokenizer, render_marked, unmark

    engine = Engine(EngineConfig(model_path=tiny, n_ctx=512, n_threads=2))
    try:
        session = ChatSession(engine, system="Sys")
        calls: list[str] = []

        def counting(text: str, **kw: bool) -> list[int]:
            calls.append(text)
            return engine.tokenize(text, **kw)

        prompt_tokenizer = PromptTokenizer(counting, engine.token_text)
        doc = "Ünïcödé text, numbers 12345 and   spaces.\n" * 200
        for tail in ["", "Question one?", "Question two, longer: é ✓ 日本"]:
            messages = [{"role": "user", "content": doc}] + ([{"role": "user", "content": tail}] if tail else [])
            text = render_marked(session.template, [{"role": "system", "content": "Sys"}, *messages])
            calls.clear()
            assert prompt_tokenizer(text) == engine.tokenize(unmark(text))
            if tail:
                assert all(doc.strip() not in c for c in calls)  # the document was not tokenized again
    finally:
        engine.close()


def test_prompt_tokenizer_applies_the_whitespace_a_special_token_eats() -> None:
    """Negative control for splitting at special tokens ourselves: a control token that strips the whitespace after
    it (llama.cpp's rstrip attribute, as some vocabularies set on <|end|>) gives the tokens whole-prompt tokenization
    gives."""
    from lcrun.chat.prompt_tokens import MarkedText, PromptTokenizer, as_content

    def tokenize(text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        out: list[int] = []
        i = 0
        while i < len(text):
            if special and text.startswith("<|x|>", i):
                out.append(1)
                i += 5
                while i < len(text) and text[i] in " \n":   # rstrip
                    i += 1
            else:
                out.append(1000 + ord(text[i]))
                i += 1
        return out

    tokenizer = PromptTokenizer(tokenize, lambda t: "<|x|>" if t == 1 else chr(t - 1000))
    text = "a<|x|>  \n" + as_content("b <|x|> c") + "<|x|>\n d"
    assert tokenizer(MarkedText(text)) == [1097, 1, 1098, 1032, *tokenize("<|x|>", special=False), 1032, 1099, 1,
                                           1100]


def test_chat_p_holds_its_reply_to_a_json_schema_or_a_grammar(tiny: Path, tmp_path: Path) -> None:
    schema = tmp_path / "reading.schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"},
                                                                   "n": {"type": "integer"}}, "required": ["ok", "n"]}))
    common = ["-p", "Answer in JSON.", "--threads", "2", "--no-history", "--max-tokens", "80"]
    shaped = lcrun(str(tiny), *common, "--json-schema", str(schema))
    assert shaped.returncode == 0, shaped.stderr
    answer = json.loads(shaped.stdout)
    assert isinstance(answer["ok"], bool) and isinstance(answer["n"], int)
    chosen = lcrun(str(tiny), *common, "--grammar", 'root ::= "yes" | "no"', "--seed", "4")
    assert chosen.returncode == 0 and chosen.stdout.strip() in ("yes", "no"), chosen.stderr
    broken = lcrun(str(tiny), *common, "--grammar", "root ::= undefined")
    assert broken.returncode == 1 and "Traceback" not in broken.stderr   # after -p's note of the chat format:
    assert broken.stderr.strip().splitlines()[-1] == \
        "error: grammar: llama.cpp cannot compile it: Undefined rule identifier 'undefined'"


def test_chat_refuses_what_a_schema_cannot_hold_before_loading() -> None:
    result = invoke("chat", "demo", "-p", "x", "-j", '{"type": "integer", "minimum": 0}', "--dry-run")
    assert_one_line_error(result, "--json-schema", "'minimum'")
    both = invoke("chat", "demo", "-p", "x", "-j", "{}", "--grammar", 'root ::= "a"', "--dry-run")
    assert both.exit_code != 0 and "give one" in both.output + both.stderr
