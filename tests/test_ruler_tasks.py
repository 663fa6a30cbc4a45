"""The RULER-style suite's tasks, with a real tokenizer (a Llama-3-style byte-level BPE, and llama.cpp's tokenizer of
a 128K-vocabulary GGUF where prompt boundaries matter): every answer is in its document the stated number of times
and nowhere else, distractors never equal an answer, the prompts fit their length in tokens and share their document
token for token, the same seed gives the same prompts, and RULER's scoring against hand-made answers."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from lcrun.niah import NiahError
from lcrun.niah.haystack import read_haystack
from lcrun.niah.ruler.grid import length_ladder
from lcrun.niah.ruler.prompts import PromptBuilder
from lcrun.niah.ruler.tasks import (CWE_COMMON, CWE_PREAMBLE, ESSAY_PREAMBLE, ESSAY_TASKS, MULTI, TASKS, VT_HOPS,
                                    postprocess, score, string_match_all, string_match_part, word_list)
from tests.fixtures.ruler_answerers import (ENTRY_RE, LIST_START, NEEDLE_RE, SINGLE_RE, VAR_RE, BpeTokenizer,
                                            llama3_renderer)

LENGTHS = (2048, 3072)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BpeTokenizer:
    return BpeTokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def builder(tokenizer: BpeTokenizer) -> PromptBuilder:
    return PromptBuilder(tokenizer, llama3_renderer(), read_haystack(), seed=7, max_ctx=max(LENGTHS))


def document(tokenizer: BpeTokenizer, prompt) -> str:  # type: ignore[no-untyped-def]
    return tokenizer.detokenize(prompt.tokens[prompt.doc_start:prompt.doc_end])


@pytest.mark.parametrize("ctx", LENGTHS)
@pytest.mark.parametrize("sample", [0, 1])
def test_essay_answers_are_in_the_document_exactly_as_often_as_stated(builder: PromptBuilder,
                                                                      tokenizer: BpeTokenizer, ctx: int,
                                                                      sample: int) -> None:
    prompts = {p.task: p for p in builder.prompts(ctx, sample, TASKS)}
    doc = document(tokenizer, prompts["single"])
    needles = NEEDLE_RE.findall(doc)
    assert len(needles) == 3 * MULTI                      # multikey + multivalue + multiquery, 4 each
    values = [v for _k, v in needles] + [n for _c, n in SINGLE_RE.findall(doc)]
    assert len(set(values)) == len(values) == 3 * MULTI + 1    # no value twice: a distractor never equals an answer
    for task in ("single", "multikey", "multivalue", "multiquery"):
        for answer in prompts[task].question.answers:
            assert doc.count(answer) == 1, (task, answer)
    by_key: dict[str, list[str]] = {}
    for key, value in needles:
        by_key.setdefault(key, []).append(value)
    multikey = prompts["multikey"].question
    [asked] = re.findall(r"numbers? for ([\w-]+) mentioned", multikey.question)
    assert by_key[asked] == list(multikey.answers)
    distractors = [v for k, vs in by_key.items() if k != asked for v in vs]
    assert distractors and not set(distractors) & set(multikey.answers)
    multivalue = prompts["multivalue"].question
    assert sorted(multivalue.answers) == sorted(next(vs for vs in by_key.values() if len(vs) == MULTI))
    assert len(prompts["multiquery"].question.answers) == MULTI


@pytest.mark.parametrize("ctx", LENGTHS)
def test_variable_tracking_chain_resolves_to_exactly_the_answers(builder: PromptBuilder, tokenizer: BpeTokenizer,
                                                                 ctx: int) -> None:
    vt = next(p for p in builder.prompts(ctx, 0, ("vt",)))
    doc = document(tokenizer, vt)
    statements = VAR_RE.findall(doc)
    assert len(statements) == VT_HOPS + 1
    names = vt.question.answers
    assert len(set(names)) == VT_HOPS + 1
    # in document order the chain holds: each variable is assigned before it is copied
    assert [s[0] for s in statements] == list(names)
    assert statements[0][2] and all(s[1] == names[i] for i, s in enumerate(statements[1:]))
    for i, name in enumerate(names):
        assert len(re.findall(rf"\b{name}\b", doc)) == (1 if i == len(names) - 1 else 2)
    value = statements[0][2]
    assert doc.count(value) == 1 and value in vt.question.question


@pytest.mark.parametrize("ctx", LENGTHS)
def test_common_words_are_the_ten_most_frequent_of_the_list(builder: PromptBuilder, tokenizer: BpeTokenizer,
                                                            ctx: int) -> None:
    cwe = builder.cwe(ctx, 0)
    listed = ENTRY_RE.findall(document(tokenizer, cwe))
    numbers = [int(n) for n in re.findall(r"(\d+)\. [a-z]+", document(tokenizer, cwe))]
    assert numbers == list(range(1, len(numbers) + 1))
    counts = Counter(listed)
    common = set(cwe.question.answers)
    assert len(common) == CWE_COMMON
    assert {counts[w] for w in common} == {6} and set(counts[w] for w in counts if w not in common) == {1}
    assert len(counts) > 3 * CWE_COMMON                   # far more words than the ten
    # the worked example before the list has words of its own
    example = tokenizer.detokenize(cwe.tokens[:cwe.doc_start]).rsplit(LIST_START, 2)[1]
    assert not common & set(ENTRY_RE.findall(example))


@pytest.mark.parametrize("ctx", LENGTHS)
def test_prompts_fill_their_length_in_tokens_and_share_their_document(builder: PromptBuilder, ctx: int) -> None:
    prompts = builder.prompts(ctx, 0, TASKS)
    assert [p.task for p in prompts] == list(TASKS)
    needed = {p.task: len(p.tokens) + p.question.max_tokens for p in prompts}
    assert max(needed.values()) <= ctx
    essay = [p for p in prompts if p.task in ESSAY_TASKS]
    # the document fills what its longest question and answer leave, up to the last whole sentence; the word list
    # up to its last whole entry
    assert ctx - 100 < max(needed[p.task] for p in essay) and ctx - 20 < needed["cwe"]
    assert len({p.doc_end for p in essay}) == 1
    shared = essay[0].tokens[:essay[0].doc_end]
    assert all(p.tokens[:p.doc_end] == shared for p in essay)
    assert len({tuple(p.tokens[p.doc_end:]) for p in essay}) == len(essay)


def test_raw_prompts_for_base_models_are_plain_text_ending_in_the_answers_first_words(tokenizer: BpeTokenizer,
                                                                                      builder: PromptBuilder) -> None:
    from lcrun.chat.formats import RawFormat

    raw = PromptBuilder(tokenizer, RawFormat(), read_haystack(), seed=7, max_ctx=max(LENGTHS))
    chat = {p.task: p for p in builder.prompts(2048, 0, TASKS)}
    for prompt in raw.prompts(2048, 0, TASKS):
        text = tokenizer.detokenize(prompt.tokens)
        assert "<|" not in text                       # no chat format: no special token at all
        assert text.startswith(CWE_PREAMBLE.split(".")[0] if prompt.task == "cwe" else ESSAY_PREAMBLE)
        assert text.endswith(prompt.question.answer_prefix.rstrip())   # for the model to complete
        assert prompt.question.answers == chat[prompt.task].question.answers    # the same needles as chat models
    control = tokenizer.detokenize(chat["single"].tokens)
    assert control.startswith("<|begin_of_text|><|start_header_id|>user")   # negative control: the chat prompt


def test_same_seed_same_prompts_other_seed_other_needles(tokenizer: BpeTokenizer, builder: PromptBuilder) -> None:
    again = PromptBuilder(tokenizer, llama3_renderer(), read_haystack(), seed=7, max_ctx=max(LENGTHS))
    assert [p.tokens for p in again.prompts(2048, 1, TASKS)] == [p.tokens for p in builder.prompts(2048, 1, TASKS)]
    other = PromptBuilder(tokenizer, llama3_renderer(), read_haystack(), seed=8, max_ctx=max(LENGTHS))
    ours, theirs = builder.prompts(2048, 1, TASKS), other.prompts(2048, 1, TASKS)
    for a, b in zip(ours, theirs):
        assert not set(a.question.answers) & set(b.question.answers), a.task
    # another sample of the same seed and length is another document
    assert builder.prompts(2048, 0, ("single",))[0].question.answers != ours[0].question.answers


def test_a_length_too_short_for_the_needles_is_refused_in_one_line(builder: PromptBuilder) -> None:
    with pytest.raises(NiahError) as err:
        builder.prompts(600, 0, ("single",))
    assert str(err.value).startswith("context: 600 tokens cannot hold") and "\n" not in str(err.value)


def test_prompt_text_round_trips_through_a_128k_vocabulary(tmp_path: Path) -> None:
    """Joined token lists spell exactly the intended text with llama.cpp's tokenizer of a Llama-3-shaped file: no
    space lost or doubled where the head, the document, the needles and the question meet."""
    from lcrun.chat.template import ChatTemplate
    from lcrun.engine.protocol import EngineConfig
    from lcrun.engine.runtime import Engine
    from tests.fixtures.realistic_gguf import LLAMA3_TEMPLATE, write_realistic_gguf

    path = write_realistic_gguf(tmp_path / "llama3.gguf", "llama3")
    with Engine(EngineConfig(model_path=path, n_ctx=256, n_threads=1)) as engine:
        renderer = ChatTemplate(LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", add_bos=True)
        built = PromptBuilder(engine, renderer, read_haystack(), seed=3, max_ctx=3584)
        for p in built.prompts(3584, 0, TASKS):
            doc = engine.detokenize(p.tokens[p.doc_start:p.doc_end])
            preamble = (f"{word_list(3, 3584, 0).example}\n{CWE_PREAMBLE}" if p.task == "cwe" else ESSAY_PREAMBLE)
            rendered = renderer.render([{"role": "user", "content": f"{preamble}\n{doc}\n{p.question.question}"}])
            expected = rendered + p.question.answer_prefix.lstrip()
            specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
            assert p.tokens[0] == engine.special_tokens()["bos"] and p.tokens.count(p.tokens[0]) == 1
            written = "".join(re.findall("|".join(map(re.escape, specials)), expected))
            assert engine.tokenize(written, special=True) == [t for t in p.tokens if t >= 128000]
            assert engine.detokenize(p.tokens) == re.sub("|".join(map(re.escape, specials)), "", expected)
            if p.task != "cwe":
                for sentence in re.findall(r"(?:VAR|One of|The special magic)[^.]*\.", doc):
                    i = doc.index(sentence)
                    assert i == 0 or doc[i - 1] in " \n", sentence
                    assert doc[i + len(sentence): i + len(sentence) + 1] in ("", " ", "\n"), sentence


def test_ruler_scoring_against_hand_made_answers() -> None:
    expected = ("1234567", "7654321", "1111111")
    assert string_match_all("The numbers are 1234567 and 7654321.", expected) == pytest.approx(2 / 3)
    assert string_match_all("none of them", expected) == 0.0
    assert string_match_all("1111111, 7654321, 1234567", expected) == 1.0
    assert string_match_all("  ZUGANO, Kikumi\x00 ", ("zugano", "kikumi")) == 1.0    # case and control characters
    assert postprocess(" a\x01b\t ") == "a\nb"
    assert string_match_part("only 7654321", expected) == 1.0 and string_match_part("no", expected) == 0.0
    from lcrun.niah.ruler.tasks import Question

    vt = Question("vt", "q", "p", ("ABCDE", "FGHIJ"), 30)
    assert score("ABCDE", vt) == 0.5


def test_the_length_ladder_doubles_from_4k_to_the_maximum() -> None:
    assert length_ladder(131072) == [4096, 8192, 16384, 32768, 65536, 131072]
    assert length_ladder(100_000) == [4096, 8192, 16384, 32768, 65536, 100_000]
    assert length_ladder(32768, per_octave=2) == [4096, 6144, 8192, 12288, 16384, 24576, 32768]
    assert length_ladder(4096) == [4096]
    with pytest.raises(NiahError, match="--max-ctx: 2,048 is below the shortest length 4,096"):
        length_ladder(2048)
