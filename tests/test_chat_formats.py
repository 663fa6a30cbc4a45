"""Chat formats as llama.cpp knows them: the format a file is prompted in (its own Jinja template; else the built-in
format its vocabulary's special tokens belong to; else ChatML), `--chat-template NAME|FILE|list`, `--raw`, and stops
at the vocabulary's end-of-generation tokens — on GGUFs of real shape (tests/fixtures/realistic_gguf.py: the
vocabulary sizes and special tokens of Llama 3, Gemma, Mistral, Phi-3, Qwen/ChatML and a GPT-2-style base model),
run by llama.cpp through lcrun's real entry point.

The realistic files have random weights with the output tied to the token embeddings, so greedy decoding repeats
the prompt's last token (the stop tests below use exactly that); for most formats that token is whitespace or a
control token, i.e. no visible text. Chat tests therefore sample hot and unfiltered (SAMPLED), which draws ordinary
tokens."""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lcrun.chat.formats import (FORMAT_RULES, RAW, TEKKEN_VARIANTS, BuiltinFormat, RawFormat, Vocabulary,
                                choose_format, engine_vocabulary, requested_format)
from lcrun.chat.session import ChatSession
from lcrun.chat.template import ChatTemplate, TemplateError
from lcrun.cli import cli
from lcrun.engine.chat_format import apply_builtin_format, builtin_formats
from lcrun.engine.protocol import GREEDY, Sampling
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.generation.records import Finished, GenerationParams, TextChunk
from lcrun.niah.grid import Cell
from lcrun.niah.haystack import read_haystack
from lcrun.niah.prompt import needle_for
from lcrun.niah.results import ResultsLog
from lcrun.niah.run import CellDone, NiahParams, prepare_run, run_cells
from lcrun.niah_cli import niah
from tests.fixtures.cli import invoke
from tests.fixtures.engines import Engines
from tests.fixtures.fake_engine import FakeEngine
from tests.fixtures.realistic_gguf import FAMILIES, write_realistic_gguf

Q = "What is the capital of France?"
# hot and unfiltered (top-k/top-p/min-p off: llama.cpp filters before it applies the temperature): see the docstring;
# one thread: two on a busy 2-core machine generate 100x slower (each token waits for both)
SAMPLED = ["--temp", "8", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--seed", "1", "--threads", "1"]


@dataclass(frozen=True)
class Variant:
    family: str
    template: bool          # the family's published template (llama3, chatml), or none
    key: str                # FormatChoice.key
    shown: str              # how the plan names it
    why: str                # part of the reason it gives
    prompt: str             # the prompt for one question Q, as the format writes it, BOS where the vocabulary adds it


LLAMA3_PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
CHATML_PROMPT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
VARIANTS = {
    "llama3": Variant("llama3", True, "jinja:file template", "file template (Jinja, sandboxed)",
                      "tokenizer.chat_template", LLAMA3_PROMPT),
    "llama3-bare": Variant("llama3", False, "builtin:llama3", "llama3 (llama.cpp built-in)",
                           "Llama 3's <|start_header_id|>", LLAMA3_PROMPT),
    "gemma": Variant("gemma", False, "builtin:gemma", "gemma (llama.cpp built-in)",
                     "Gemma's <start_of_turn> <end_of_turn>",
                     "<bos><start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"),
    "mistral": Variant("mistral", False, "builtin:mistral-v3", "mistral-v3 (llama.cpp built-in)",
                       "Mistral's [INST] [/INST]", "<s>[INST] {q}[/INST]"),
    "phi3": Variant("phi3", False, "builtin:phi3", "phi3 (llama.cpp built-in)", "Phi-3's <|user|>",
                    "<|user|>\n{q}<|end|>\n<|assistant|>\n"),        # Phi-3 adds no BOS
    "chatml": Variant("chatml", True, "jinja:file template", "file template (Jinja, sandboxed)",
                      "tokenizer.chat_template", CHATML_PROMPT),
    "chatml-bare": Variant("chatml", False, "builtin:chatml", "chatml (llama.cpp built-in)",
                           "ChatML's <|im_start|> <|im_end|>", CHATML_PROMPT),
    # no chat tokens at all: ChatML as plain text, as llama.cpp does
    "base": Variant("base", True, "builtin:chatml", "chatml (llama.cpp built-in)",
                    "no chat tokens: llama.cpp's default", CHATML_PROMPT),
}


@pytest.fixture(scope="session")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The realistic file of a variant, written once per test session (the big vocabularies take seconds)."""
    root = tmp_path_factory.mktemp("realistic")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            variant = VARIANTS[name]
            made[name] = write_realistic_gguf(root / f"{name}.gguf", variant.family, template=variant.template)
        return made[name]

    return get


@pytest.fixture(autouse=True)
def _niah_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.commands, "niah", niah)


def lcrun(*args: str | Path, stdin: str | None = None):  # type: ignore[no-untyped-def]
    return invoke(*map(str, args), stdin=stdin)


class Kept(Engine):
    """llama.cpp's engine, kept open after the command is done with it (its cache holds what ran)."""

    def close(self) -> None:
        pass


@pytest.fixture
def engines(engines: Engines) -> Iterator[Engines]:
    """The real engines the command made, kept open for the test to look into (closed at the end)."""
    engines.use(Kept)
    yield engines
    for engine in engines:
        Engine.close(engine)


@pytest.fixture
def no_engine(engines: Engines) -> None:
    engines.refuse("the model was loaded")


# -- llama.cpp's built-in formats -----------------------------------------------------------------------------------
def test_the_built_in_names_are_llama_cpps() -> None:
    names = builtin_formats()
    assert len(names) >= 40 and len(set(names)) == len(names)
    assert {"chatml", "llama3", "gemma", "mistral-v3", "mistral-v7", "phi3", "zephyr", "llama2"} <= set(names)
    detected = {rule.name for rule in FORMAT_RULES} | {f"{name}-tekken" for name in TEKKEN_VARIANTS}
    assert detected <= set(names), detected - set(names)


def test_built_in_formats_are_rendered_by_llama_cpp_with_the_bos_the_vocabulary_adds() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    # Gemma has no system role: llama.cpp folds it into the first user turn, and calls the assistant "model"
    assert BuiltinFormat("gemma", "<bos>", add_bos=True).render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n")
    assert BuiltinFormat("mistral-v3", "<s>", add_bos=False).render(messages) == (
        "[INST] Be brief.\n\n Hi [/INST] Hello.</s>[INST] Again[/INST]")
    chatml = BuiltinFormat("chatml").render(messages[1:2], add_generation_prompt=False)
    assert chatml == "<|im_start|>user\n Hi <|im_end|>\n"
    # longer than the first buffer, with multi-byte characters: nothing cut
    long = "é日本 " * 5000
    assert BuiltinFormat("chatml").render([{"role": "user", "content": long}]) == \
        f"<|im_start|>user\n{long}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError, match="no-such-format: llama.cpp does not know this chat format"):
        BuiltinFormat("no-such-format").render(messages)


def test_raw_is_the_text_itself() -> None:
    messages = [{"role": "system", "content": "Notes:"}, {"role": "user", "content": "Once upon a time"}]
    assert RawFormat().render(messages) == "Notes:\n\nOnce upon a time"
    assert RawFormat("<s>", add_bos=True).render(messages[1:]) == "<s>Once upon a time"


# -- the choice -----------------------------------------------------------------------------------------------------
def vocabulary(*specials: str, template: str | None = None, model: str = "llama") -> Vocabulary:
    return Vocabulary(template, set(specials).__contains__, model)


@pytest.mark.parametrize("specials, model, expected", [
    (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "gpt2", "llama3"),
    (("<|im_start|>", "<|im_end|>"), "gpt2", "chatml"),
    (("<|im_start|>", "<|im_end|>", "<|im_sep|>"), "gpt2", "phi4"),
    (("<start_of_turn>", "<end_of_turn>"), "llama", "gemma"),
    (("[INST]", "[/INST]"), "llama", "mistral-v3"),
    (("[INST]", "[/INST]"), "gpt2", "mistral-v3-tekken"),
    (("[INST]", "[/INST]", "[SYSTEM_PROMPT]"), "gpt2", "mistral-v7-tekken"),
    (("<|user|>", "<|assistant|>", "<|end|>"), "llama", "phi3"),
    # negative controls: half of a format's tokens, or none, is no format: ChatML, llama.cpp's default
    (("<start_of_turn>",), "llama", "chatml"),
    (("<|start_header_id|>",), "gpt2", "chatml"),
    ((), "gpt2", "chatml"),
])
def test_a_file_without_a_template_gets_the_format_of_its_special_tokens(specials: tuple[str, ...], model: str,
                                                                        expected: str) -> None:
    choice = choose_format(vocabulary(*specials, model=model))
    assert (choice.kind, choice.name) == ("builtin", expected)
    if specials and expected != "chatml":
        assert all(token in choice.why for token in specials[:2]), choice.why
    if not specials:
        assert "no chat tokens" in choice.why and "--raw" in choice.why


def test_the_files_template_comes_first_and_what_the_user_asks_before_it() -> None:
    gemma_tokens = vocabulary("<start_of_turn>", "<end_of_turn>", template="{{ messages[0]['content'] }}")
    assert choose_format(gemma_tokens).kind == "jinja"
    asked = requested_format("phi3")
    assert choose_format(gemma_tokens, asked) is asked
    assert choose_format(gemma_tokens, RAW) is RAW
    with pytest.raises(TemplateError, match="the model file's template is not valid Jinja .*--chat-template NAME"):
        choose_format(vocabulary(template="{% for m in messages %}"))


def test_what_chat_template_asks_for(tmp_path: Path) -> None:
    assert requested_format("gemma") == requested_format("gemma")
    assert (requested_format("gemma").kind, requested_format("gemma").why) == ("builtin", "--chat-template gemma")
    good = tmp_path / "mine.jinja"
    good.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    mine = requested_format(str(good))
    assert (mine.kind, mine.name, mine.source) == ("jinja", "mine.jinja", good.read_text())
    key = mine.key
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")  # same name, other prompts: another key
    assert key.startswith("jinja:mine.jinja@") and requested_format(str(good)).key != key
    inline = requested_format("{{ messages[0].content }}")
    assert inline.kind == "jinja" and inline.source == "{{ messages[0].content }}"
    # a file named like a built-in format is still the format (and --chat-template-file takes the file)
    (tmp_path / "gemma").write_text("{{ 'file' }}")
    assert requested_format("gemma").kind == "builtin"
    assert requested_format(str(tmp_path / "gemma"), file_only=True).kind == "jinja"


@pytest.mark.parametrize("make, message", [
    (lambda d: "gema", r"^gema: neither one of llama.cpp's built-in chat formats nor a template file \(did you "
                       r"mean gemma\? --chat-template list shows the formats\)$"),
    (lambda d: _write(d / "bad.jinja", "{% for m in messages %}{{ m.content }}"),
     r"bad.jinja: not valid Jinja \(line 1: .*\)$"),
    (lambda d: _write(d / "bin.jinja", b"\xff\xfe{{"), r"bin.jinja: not a Jinja chat template \(not UTF-8 text\)$"),
    (lambda d: _write(d / "empty.jinja", "  \n"), r"empty.jinja: empty: no chat template in it$"),
    (lambda d: str(d), r": a folder, not a chat template file$"),
    (lambda d: "{{ unclosed", r"^--chat-template: not valid Jinja"),
])
def test_bad_chat_templates_are_one_line_errors(tmp_path: Path, make: Callable[[Path], str], message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        requested_format(make(tmp_path))
    assert "\n" not in str(caught.value) and re.search(message, str(caught.value)), str(caught.value)


def _write(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


# -- the command line, before any model loads ------------------------------------------------------------------------
def test_chat_template_list_prints_llama_cpps_names_without_a_model() -> None:
    for command in ("chat", "niah"):
        result = lcrun(command, "--chat-template", "list")
        assert result.exit_code == 0, result.output
        assert result.stdout.split() == list(builtin_formats())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dry_run_names_the_format_and_why_from_the_header_alone(name: str, realistic: Callable[[str], Path],
                                                                no_engine: None) -> None:
    variant = VARIANTS[name]
    result = lcrun("chat", realistic(name), "--dry-run")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("chat format "))
    assert line.startswith(f"chat format {variant.shown} · ") and variant.why in line, line


def test_bad_options_are_one_line(realistic: Callable[[str], Path], tmp_path: Path, no_engine: None) -> None:
    model = realistic("phi3")
    bad = Path(_write(tmp_path / "bad.jinja", "{% if %}"))
    for args in [("chat", model, "--chat-template", bad), ("niah", model, "--chat-template", bad),
                 ("chat", model, "--chat-template-file", bad)]:
        result = lcrun(*args)
        assert result.exit_code == 2 and result.stdout == "", result.output
        assert re.fullmatch(r"error: Invalid value for '--chat-template(-file)?': \S*bad.jinja: not valid Jinja "
                            r"\(line 1: .*\) \(see `lcrun (chat|niah) --help`\)\n", result.stderr), result.stderr
    cases = {("--raw",): "--raw continues one prompt as plain text: give the prompt with -p",
             ("--raw", "-p", "x", "--chat-template", "gemma"): "--chat-template and --raw exclude each other",
             ("--chat-template-file", "gemma"): "gemma: no such file"}
    for args, message in cases.items():
        result = lcrun("chat", model, *args)
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, \
            result.stderr


def test_a_broken_template_in_the_file_is_one_line_and_a_name_overrides_it(tmp_path: Path, no_engine: None) -> None:
    model = write_realistic_gguf(tmp_path / "broken.gguf", "phi3", template="{% for m in messages %}")
    result = lcrun("chat", model, "--dry-run")
    assert result.exit_code == 1 and result.stdout == ""
    assert re.fullmatch(r"error: chat template: the model file's template is not valid Jinja \(line 1: .*\); "
                        r"choose a format with --chat-template NAME \(--chat-template list shows them\)\n",
                        result.stderr), result.stderr
    fixed = lcrun("chat", model, "--dry-run", "--chat-template", "phi3")
    assert fixed.exit_code == 0 and "chat format phi3 (llama.cpp built-in) · --chat-template phi3" in fixed.stdout


# -- on llama.cpp -----------------------------------------------------------------------------------------------------
def prompt_of(engine: Engine, completion: int) -> list[int]:
    cached = engine.cached_tokens
    return cached[: len(cached) - completion]


def stats(stderr: str) -> tuple[int, int]:
    """(prompt tokens, generated tokens) from the one-shot statistics line."""
    match = re.search(r"([\d,]+) prompt tokens .* ([\d,]+) generated", stderr)
    assert match, stderr
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_chat_p_on_each_file(name: str, realistic: Callable[[str], Path], engines: Engines) -> None:
    variant = VARIANTS[name]
    result = lcrun("chat", realistic(name), "-p", Q, "--max-tokens", "8", "--no-history", "--ctx", "1024", *SAMPLED)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip(), "an empty reply"
    assert f"chat format: {variant.shown} · " in result.stderr and variant.why in result.stderr
    prompt_tokens, generated = stats(result.stderr)
    engine = engines[0]
    assert engine.cached_tokens[:prompt_tokens] == engine.tokenize(variant.prompt.format(q=Q)) and generated >= 1
    family = FAMILIES[variant.family]
    assert (engine.cached_tokens[0] == family.bos) == family.add_bos  # BOS first exactly where the vocabulary asks
    # the loaded vocabulary leads to the choice the header did
    assert choose_format(engine_vocabulary(engine)).key == variant.key


@pytest.mark.slow
def test_special_tokens_are_tokens_only_where_the_vocabulary_has_them(realistic: Callable[[str], Path],
                                                                      engines: Engines) -> None:
    """The same ChatML prompt is 3 special tokens in Qwen's vocabulary and plain text in a base model's."""
    ids = {}
    for name in ("chatml-bare", "base"):
        assert lcrun("chat", realistic(name), "-p", Q, "--max-tokens", "2", "--no-history", "--ctx", "1024",
                     *SAMPLED).exit_code == 0
        engine = engines[-1]
        ids[name] = engine.tokenize("<|im_start|>")
    assert len(ids["chatml-bare"]) == 1 and len(ids["base"]) > 3


@pytest.mark.slow
def test_two_turns_in_a_built_in_format_reuse_the_cache(realistic: Callable[[str], Path]) -> None:
    # flash attention off: on a CPU it would re-evaluate a few cached tokens to make a full batch
    engine = Engine(EngineConfig(model_path=realistic("gemma"), n_ctx=1024, n_threads=1, flash_attn=False))
    try:
        session = ChatSession(engine, params=GenerationParams(
            Sampling(temperature=8, top_k=0, top_p=1, min_p=0, seed=1), max_tokens=6))
        assert session.chat_format is not None and session.chat_format.name == "gemma"
        first = list(session.ask("First question?"))[-1]
        second = list(session.ask("Second one?"))[-1]
        assert isinstance(first, Finished) and isinstance(second, Finished)
        assert second.reused_tokens >= first.prompt_tokens  # the first turn came back from the cache
        tokens = engine.cached_tokens
        assert tokens[0] == 2 and tokens.count(2) == 1 and tokens.count(105) == 4  # BOS once, <start_of_turn> ×4
    finally:
        engine.close()


@pytest.mark.slow
def test_stops_come_from_the_vocabularys_end_of_generation_tokens(realistic: Callable[[str], Path]) -> None:
    """Greedy decoding on these files repeats the prompt's last token: a format ending in an end-of-generation token
    stops at once, one ending in another special token runs to the limit. <|eom_id|> ends generation in llama.cpp's
    vocabulary though it is neither the file's eos nor its eot."""
    cases = {"llama3": [("<|eom_id|>", "stop"), ("<|end_of_text|>", "stop"), ("<|python_tag|>", "length")],
             "gemma": [("<end_of_turn>", "stop"), ("<start_of_turn>", "length")],
             "phi3": [("<|end|>", "stop"), ("<|user|>", "length")]}
    for name, endings in cases.items():
        engine = Engine(EngineConfig(model_path=realistic(name), n_ctx=512, n_threads=1))
        try:
            if name == "llama3":  # neither is the eos or eot the file declares
                declared = set(engine.special_tokens().values())
                assert not declared & {engine.tokenize("<|eom_id|>")[0], engine.tokenize("<|end_of_text|>")[0]}
            for ending, reason in endings:
                template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}" + ending)
                session = ChatSession(engine, template=template, params=GenerationParams(GREEDY, max_tokens=4))
                finished = list(session.ask("Hello there"))[-1]
                assert isinstance(finished, Finished) and finished.reason == reason, (name, ending, finished)
                assert finished.completion_tokens == (1 if reason == "stop" else 4)
        finally:
            engine.close()


@pytest.mark.slow
def test_chat_template_name_overrides_the_vocabularys_format(realistic: Callable[[str], Path],
                                                             engines: Engines) -> None:
    """Phi-3's vocabulary, Zephyr's format (<|endoftext|> ends a turn instead of <|end|>): llama.cpp renders it."""
    result = lcrun("chat", realistic("phi3"), "--chat-template", "zephyr", "-p", Q, "--max-tokens", "4",
                   "--no-history", "--ctx", "1024", *SAMPLED)
    assert result.exit_code == 0, result.output
    assert "chat format: zephyr (llama.cpp built-in) · --chat-template zephyr" in result.stderr
    engine = engines[0]
    prompt, _ = stats(result.stderr)
    assert engine.cached_tokens[:prompt] == engine.tokenize(f"<|user|>\n{Q}<|endoftext|>\n<|assistant|>\n")


@pytest.mark.slow
def test_chat_template_file_is_rendered_sandboxed_with_the_bos_the_vocabulary_adds(
        realistic: Callable[[str], Path], engines: Engines, tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                        "### ASSISTANT:")
    result = lcrun("chat", realistic("gemma"), "--chat-template", template, "-p", Q, "--system", "Be brief.",
                   "--max-tokens", "4", "--no-history", "--ctx", "1024", *SAMPLED)
    assert result.exit_code == 0, result.output
    assert f"chat format: plain.jinja (Jinja, sandboxed) · --chat-template {template}" in result.stderr
    engine = engines[0]
    prompt, _ = stats(result.stderr)
    # the template writes no BOS; Gemma's vocabulary adds one, as llama-server does
    assert engine.cached_tokens[:prompt] == engine.tokenize(f"<bos>### SYSTEM: Be brief.\n### USER: {Q}\n"
                                                            "### ASSISTANT:")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "gemma"])
def test_raw_continues_the_prompt_as_plain_text(name: str, realistic: Callable[[str], Path],
                                                engines: Engines) -> None:
    text = "Once upon a time, in a land far away"
    result = lcrun("chat", realistic(name), "--raw", "-p", text, "--temp", "0", "--max-tokens", "6",
                   "--no-history", "--ctx", "1024", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip(), "an empty continuation"  # greedy: the last word again and again, but text
    assert "chat format: none · --raw: the prompt is continued as plain text" in result.stderr
    engine = engines[0]
    prompt, _ = stats(result.stderr)
    bos = [2] if name == "gemma" else []  # Gemma's vocabulary adds BOS; the GPT-2-style one does not
    assert engine.cached_tokens[:prompt] == bos + engine.tokenize(text)


# -- niah ------------------------------------------------------------------------------------------------------------
GRID = ["--min-ctx", "300", "--max-ctx", "600", "--ctx-steps", "2", "--depth-interval", "1.0", "--threads", "1",
        "--json"]


def niah_cells(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_niah_grid_on_each_file(name: str, realistic: Callable[[str], Path], tmp_path: Path) -> None:
    variant = VARIANTS[name]
    out = tmp_path / "r.jsonl"
    result = lcrun("niah", realistic(name), *GRID, "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["complete"] and summary["cells_total"] == 4 and summary["engine"]["chat_format"] == variant.key
    assert f"chat format {variant.shown} · " in result.stderr
    cells = niah_cells(out)
    assert len(cells) == 4 and all(c["answer_tokens"] >= 1 and abs(c["doc_tokens"] - c["ctx"]) <= 1 for c in cells)
    assert json.loads(out.read_text().splitlines()[0])["chat_format"] == variant.key


@pytest.mark.slow
def test_niah_raw_asks_for_a_completion_and_scores_it_the_same_way(realistic: Callable[[str], Path],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "raw.jsonl"
    result = lcrun("niah", realistic("base"), *GRID, "--raw", "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["engine"]["chat_format"] == "raw"
    assert "chat format none · --raw" in result.stderr
    cells = niah_cells(out)
    assert len(cells) == 4 and all(c["answer"] for c in cells)  # greedy repeats "is": text, not a turn marker
    # resuming under another format is refused: its prompts differ
    again = lcrun("niah", realistic("base"), *GRID, "-o", out, "--resume")
    assert again.exit_code == 1 and "chat_format 'raw' there, 'builtin:chatml' now" in again.stderr


def test_niah_raw_prompt_ends_in_a_sentence_to_complete(tmp_path: Path) -> None:
    def completes(prompt: str) -> str:
        number = re.search(r"The special magic \w+ number is: (\d+)\.", prompt)
        return f" {number[1]}." if number and prompt.endswith("number is") else "?"

    engine = FakeEngine(n_ctx=8192, responder=completes)
    run = prepare_run(engine, NiahParams(min_ctx=1000, max_ctx=1000, ctx_steps=1), read_haystack(), RAW)
    cell = Cell(1000, 0.5, 0)
    needle = needle_for(cell, 0, 8)
    prompt = engine.detokenize(run.builder.build(run.stream, cell, needle).tokens)
    assert prompt.startswith("<|begin_of_text|>") and "<|start_header_id|>" not in prompt  # BOS, then plain text
    assert prompt.endswith(f"\n\nQuestion: What is the special magic {needle.city} number mentioned in the text "
                           f"above?\nAnswer: The special magic {needle.city} number is")
    with ResultsLog(tmp_path / "r.jsonl", {}, resume=False, force=False) as log:
        records = [e.record for e in run_cells(engine, run, log) if isinstance(e, CellDone)]
    assert records and all(r["score"] == 1 and r["answer"] == f"{r['number']}." for r in records)


# -- an interactive turn in a real terminal ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: this test drives lcrun chat "
                                                         "in a real terminal through tmux")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_an_interactive_turn_on_each_file(name: str, realistic: Callable[[str], Path], tmp_path: Path) -> None:
    from tests.test_chat_tmux import Pane, _lcrun, _status_line

    variant = VARIANTS[name]
    home, history = tmp_path / "_home", tmp_path / "transcript.jsonl"
    command = [
        "env", "-u", "NO_COLOR", "-u", "COLUMNS", "-u", "LINES", "TERM=xterm-256color", f"HOME={home}",
        f"XDG_DATA_HOME={home / '.local' / 'share'}", f"XDG_CACHE_HOME={home / '.cache'}",
        f"XDG_CONFIG_HOME={home / '.config'}", f"HF_HOME={home / 'hf'}", "HF_HUB_OFFLINE=1",
        *_lcrun(), "chat", str(realistic(name)), "--ctx", "2048", "--max-tokens", "12",
        "--history", str(history), *SAMPLED,
    ]
    pane = Pane(tmp_path, command)
    try:
        pane.wait_for("the input prompt", lambda lines: any(line.rstrip() == ">" for line in lines))
        screen = "\n".join(pane.lines())
        assert f"chat format {variant.shown} · " in screen, screen  # in the plan panel
        pane.type(Q)
        _reply, status = pane.wait_for("the reply's status line", lambda lines: _status_line(lines, Q))
        assert "tok/s" in status
        pane.type("/quit")
        pane.wait_for("lcrun to exit", lambda _lines: pane.exit_status() is not None)
        assert pane.exit_status() == 0, "\n".join(pane.lines())
    finally:
        pane.close()
    records = [json.loads(line) for line in history.read_text(encoding="utf-8").splitlines()]
    assert [r["user"] for r in records] == [Q] and records[0]["assistant"].strip()
