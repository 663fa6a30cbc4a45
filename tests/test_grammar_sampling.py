"""llama.cpp's grammar sampler as the engine uses it (lcrun.engine.grammar), on a 128K-token Llama 3 vocabulary: a
JSON-schema reply from the real engine parses and validates (with random weights, whose unconstrained reply is no
JSON); the cheap resample is exactly the grammar-first sample over the whole vocabulary; tokens llama.cpp's grammar
would misread (a NUL inside, bytes that are no UTF-8) never pass; a lazy grammar waits for its trigger; a grammar that
cannot compile is named, and one that cannot go on ends only its own request.

The sampler is driven two ways: by the engine's own logits, and — to reach the states a random model rarely visits —
by chosen logits through `GrammarSampler.sample_from`, with the real chain, grammar and vocabulary."""
from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytest
from pydantic import BaseModel, Field

from lcrun.engine.grammar import TOKEN_DATA, GrammarSampler, VocabularyIndex, init_grammar
from lcrun.engine.protocol import GREEDY, EngineConfig, Grammar, Sampling
from lcrun.engine.runtime import Engine
from lcrun.engine.sampler import sampler_chain
from lcrun.engine.vocab import VocabularyFile
from lcrun.errors import GrammarError
from lcrun.generation.drive import generate
from lcrun.generation.json_schema import schema_grammar
from lcrun.generation.loop import DecodeLoop
from lcrun.generation.records import Failed, Finished, GenerationParams, Request, TextChunk
from tests.fixtures.realistic_gguf import write_realistic_gguf


class Reading(BaseModel):
    sensor: str = Field(max_length=12)
    value: int
    ok: bool
    unit: str = Field(pattern=r"^[a-z]{1,3}$")
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=2)   # bounded: random weights ramble


@pytest.fixture(scope="module")
def llama3_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_realistic_gguf(tmp_path_factory.mktemp("grammar") / "llama3.gguf", "llama3")


@pytest.fixture(scope="module")
def engine(llama3_file: Path) -> Iterator[Engine]:
    with Engine(EngineConfig(llama3_file, n_ctx=1024, n_seq=2, n_threads=1, n_threads_batch=1)) as made:
        yield made


def reply(engine: Engine, params: GenerationParams, text: str = "Send the reading as JSON:") -> tuple[str, Finished]:
    prompt = engine.tokenize(text, add_bos=True)
    parts, done = [], None
    for event in generate(engine, Request(prompt, params)):
        if isinstance(event, TextChunk):
            parts.append(event.text)
        elif isinstance(event, Finished):
            done = event
    assert done is not None
    return "".join(parts), done


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [GREEDY, Sampling(seed=11), Sampling(temperature=1.5, top_k=0, seed=3)])
def test_a_json_schema_reply_on_a_128k_vocabulary_parses_and_validates(engine: Engine, sampling: Sampling) -> None:
    grammar = schema_grammar(Reading.model_json_schema())
    text, done = reply(engine, GenerationParams(sampling, max_tokens=400, grammar=grammar))
    assert done.reason == "stop", text
    Reading.model_validate_json(text)   # valid against the schema, not just JSON
    free, _ = reply(engine, GenerationParams(sampling, max_tokens=60))
    with pytest.raises(ValueError):     # negative control: without the grammar this model writes no JSON
        json.loads(free)


# -- chosen logits ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab(llama3_file: Path) -> Iterator[VocabularyFile]:
    with VocabularyFile(llama3_file) as made:
        yield made


@pytest.fixture(scope="module")
def index(vocab: VocabularyFile) -> VocabularyIndex:
    built = VocabularyIndex(vocab._lc, vocab._vocab, vocab.n_vocab)
    built.build()
    return built


def sampler(vocab: VocabularyFile, index: VocabularyIndex, grammar: Grammar) -> GrammarSampler:
    return GrammarSampler(vocab._lc, None, vocab._vocab, index, grammar, np.zeros(vocab.n_vocab, dtype=TOKEN_DATA))


def grammar_first(vocab: VocabularyFile, g: GrammarSampler, logits: np.ndarray) -> int:
    """The greedy token over the whole vocabulary with a copy of the grammar applied first (what llama.cpp's
    grammar-first sampling gives), and the grammar left as it was."""
    lc = vocab._lc
    clone = lc.llama_sampler_clone(g._sampler)
    data = np.zeros(vocab.n_vocab, dtype=TOKEN_DATA)
    data["id"], data["logit"] = np.arange(vocab.n_vocab), logits
    array = lc.llama_token_data_array(data=data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)),
                                      size=vocab.n_vocab, selected=-1, sorted=False)
    lc.llama_sampler_apply(clone, ctypes.byref(array))
    lc.llama_sampler_free(clone)
    # what llama.cpp cannot check (a NUL inside, broken UTF-8) is not allowed here either
    allowed = [int(t) for t in np.flatnonzero(np.isfinite(data["logit"])) if g.allows(int(t))]
    return max(allowed, key=lambda t: logits[t])


def test_the_resample_is_the_grammar_first_sample_over_the_whole_vocabulary(vocab: VocabularyFile,
                                                                           index: VocabularyIndex) -> None:
    g = sampler(vocab, index, schema_grammar(Reading.model_json_schema()))
    chain = sampler_chain(vocab._lc, vocab.n_vocab, GREEDY)
    rng = np.random.default_rng(5)
    text, resampled = b"", 0
    try:
        for _ in range(80):
            logits = rng.standard_normal(vocab.n_vocab).astype(np.float32) * 3
            expected = grammar_first(vocab, g, logits)
            before = g.resampled
            token = g.sample_from(chain, logits)
            assert token == expected
            resampled += g.resampled - before
            if vocab.is_eog(token):
                break
            text += index.piece(token)
    finally:
        vocab._lc.llama_sampler_free(chain)
        g.free()
    assert resampled > 10   # the random logits forced the resample path, not just the one-token check
    Reading.model_validate_json(text.decode("utf-8"))


def test_tokens_the_grammar_would_misread_never_pass(vocab: VocabularyFile, index: VocabularyIndex) -> None:
    nul_inside = next(t for t in range(vocab.n_vocab) if b"\x00" in index.piece(t)[1:] and
                      index.piece(t)[:1] == b'"')
    lead_only = next(t for t in range(vocab.n_vocab) if index.piece(t) == b"\xe4")
    g = sampler(vocab, index, Grammar('root ::= "\\"" [^"\\\\\\x00-\\x1F]* "\\""'))
    chain = sampler_chain(vocab._lc, vocab.n_vocab, GREEDY)
    try:
        logits = np.zeros(vocab.n_vocab, dtype=np.float32)
        logits[nul_inside] = 50.0       # llama.cpp would read it as `"` and let the rest through
        first = g.sample_from(chain, logits)
        assert first != nul_inside and g.allows(first) and 0 not in index.piece(first)
        logits = np.zeros(vocab.n_vocab, dtype=np.float32)
        logits[lead_only] = 50.0
        assert g.sample_from(chain, logits) == lead_only   # a character's first byte: fine so far …
        control_after = next(t for t in range(vocab.n_vocab) if index.piece(t) == b"\x01")
        logits = np.zeros(vocab.n_vocab, dtype=np.float32)
        logits[control_after] = 50.0    # … but llama.cpp would take \x01 as its continuation
        token = g.sample_from(chain, logits)
        assert token != control_after and 0x80 <= index.piece(token)[0] <= 0xBF
    finally:
        vocab._lc.llama_sampler_free(chain)
        g.free()


def token_of(vocab: VocabularyFile, text: str) -> int:
    tokens = vocab.tokenize(text, special=True)
    assert len(tokens) == 1, (text, tokens)
    return tokens[0]


def favour(vocab: VocabularyFile, token: int) -> np.ndarray:
    logits = np.zeros(vocab.n_vocab, dtype=np.float32)
    logits[token] = 40.0
    return logits


CALL = 'root ::= "{" "\\"name\\":" [ ]? "\\"f\\"" "}"'


@pytest.mark.parametrize("opening", ["x", "{"])
def test_a_lazy_grammar_holds_only_from_a_reply_that_opens_a_call(vocab: VocabularyFile, index: VocabularyIndex,
                                                                  opening: str) -> None:
    g = sampler(vocab, index, Grammar(CALL, lazy=True, trigger_prefixes=("{",)))
    chain = sampler_chain(vocab._lc, vocab.n_vocab, GREEDY)
    junk = token_of(vocab, "x")
    try:
        first = g.sample_from(chain, favour(vocab, token_of(vocab, opening)))
        out = index.piece(first)
        for _ in range(12):
            token = g.sample_from(chain, favour(vocab, junk))
            if vocab.is_eog(token):
                break
            out += index.piece(token)
    finally:
        vocab._lc.llama_sampler_free(chain)
        g.free()
    if opening == "{":
        assert json.loads(out) == {"name": "f"} and g.active
    else:
        assert out == b"x" * 13 and not g.active   # never triggered: the junk the logits ask for


def test_a_lazy_grammar_triggers_on_its_token(vocab: VocabularyFile, index: VocabularyIndex) -> None:
    tag = token_of(vocab, "<|python_tag|>")
    g = sampler(vocab, index, Grammar('root ::= "<|python_tag|>" "{" "\\"name\\":" "\\"f\\"" "}"', lazy=True,
                                      trigger_tokens=(tag,)))
    chain = sampler_chain(vocab._lc, vocab.n_vocab, GREEDY)
    junk = token_of(vocab, "x")
    try:
        before = [g.sample_from(chain, favour(vocab, junk)) for _ in range(3)]
        assert before == [junk] * 3 and not g.active
        assert g.sample_from(chain, favour(vocab, tag)) == tag and g.active
        after = b""
        for _ in range(12):
            token = g.sample_from(chain, favour(vocab, junk))
            if vocab.is_eog(token):
                break
            after += index.piece(token)
        assert json.loads(after) == {"name": "f"}
    finally:
        vocab._lc.llama_sampler_free(chain)
        g.free()


def test_a_grammar_llama_cpp_cannot_compile_is_named(vocab: VocabularyFile) -> None:
    for gbnf, named in (('root ::= "a" foo', "Undefined rule identifier 'foo'"), ('root ::= "a" (', "expecting ')'"),
                        ('root ::= root "a" | "b"', "left recursion")):
        with pytest.raises(GrammarError) as caught:
            init_grammar(vocab._lc, vocab._vocab, Grammar(gbnf))
        assert named in str(caught.value)


def test_a_grammar_that_cannot_go_on_ends_only_its_request(engine: Engine) -> None:
    loop = DecodeLoop(engine)
    events: dict[int, list[Any]] = {0: [], 1: []}
    prompt = engine.tokenize("Two requests side by side", add_bos=True)
    stuck = Grammar('root ::= "a" [\\x00]')   # no token's piece can start with NUL: nothing may follow "a"
    loop.submit(loop.slots[0], Request(prompt, GenerationParams(GREEDY, max_tokens=8, grammar=stuck)), events[0].append)
    loop.submit(loop.slots[1], Request(prompt, GenerationParams(GREEDY, max_tokens=8)), events[1].append)
    for _ in range(100):
        if not loop.busy:
            break
        loop.step()
    assert isinstance(events[0][-1], Failed) and isinstance(events[0][-1].error, GrammarError)
    assert "no token" in str(events[0][-1].error)
    assert isinstance(events[1][-1], Finished) and events[1][-1].completion_tokens == 8
