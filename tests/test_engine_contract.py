"""The engine's interface (lcrun.engine.protocol) held against both engines that claim it: the real llama.cpp engine
and the fake engine of the UI and server tests. Every member is present with the protocol's signature and value
types, and the behaviour callers rely on — driven through lcrun.generation's one decode loop, as every front end
drives it: the order of streamed records, KV prefix reuse, cancellation, limits, state files, the tokenizer's round
trip — is the same on both."""
from __future__ import annotations

import inspect
import threading
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from lcrun.engine.protocol import GREEDY, EngineProtocol, Feed, PromptPlan
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.errors import EngineError
from lcrun.generation.drive import generate, prefill
from lcrun.generation.records import Finished, GenerationParams, PrefillProgress, Request, TextChunk
from tests.fixtures.fake_engine import FakeEngine

N_CTX = 512
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 日本語 text, numbers 12345 and more words follow here."


def protocol_members(protocol: type) -> dict[str, object]:
    """Name → what the protocol declares: a function, a property, or the type hint of a data member."""
    members: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if not getattr(klass, "_is_protocol", False) or klass in (typing.Protocol, typing.Generic):
            continue
        members.update(typing.get_type_hints(klass))
        members.update({name: value for name, value in vars(klass).items()
                        if (not name.startswith("_") or name in ("__enter__", "__exit__"))
                        and (callable(value) or isinstance(value, property))})
    return members


def conforms(value: object, hint: object) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    return isinstance(value, origin or hint)  # type: ignore[arg-type]


def signature_problems(declared: inspect.Signature, actual: inspect.Signature) -> list[str]:
    """What a caller written against `declared` would trip over in `actual`."""
    problems = []
    params = dict(actual.parameters)
    positional = [p.name for p in actual.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, (name, want) in enumerate(p for p in declared.parameters.items() if p[0] != "self"):
        got = params.pop(name, None)
        if got is None:
            if not any(p.kind is p.VAR_KEYWORD for p in actual.parameters.values()):
                problems.append(f"no parameter {name!r}")
            continue
        if want.kind is want.KEYWORD_ONLY and got.kind not in (got.KEYWORD_ONLY, got.POSITIONAL_OR_KEYWORD):
            problems.append(f"{name!r} cannot be passed by keyword")
        if want.kind in (want.POSITIONAL_ONLY, want.POSITIONAL_OR_KEYWORD) and positional[i:i + 1] != [name]:
            problems.append(f"{name!r} is not positional parameter {i + 1}")
        if want.default is not want.empty and got.default != want.default:
            problems.append(f"{name!r} defaults to {got.default!r}, not {want.default!r}")
    for name, extra in params.items():
        if extra.default is extra.empty and extra.kind not in (extra.VAR_POSITIONAL, extra.VAR_KEYWORD):
            problems.append(f"extra parameter {name!r} without a default")
    return problems


def contract_problems(engine: object, protocol: type) -> list[str]:
    problems = []
    for name, declared in protocol_members(protocol).items():
        if not hasattr(engine, name):
            problems.append(f"{name}: missing")
            continue
        value = getattr(engine, name)
        if isinstance(declared, property):
            hint = typing.get_type_hints(declared.fget)["return"]
            if not conforms(value, hint):
                problems.append(f"{name}: {value!r} is not {hint}")
        elif inspect.isfunction(declared):
            declared_sig = inspect.signature(declared)
            problems += [f"{name}: {p}" for p in signature_problems(declared_sig, inspect.signature(value))]
        elif not conforms(value, declared):
            problems.append(f"{name}: {value!r} is not {declared}")
    return problems


@pytest.fixture(scope="module")
def gguf_path(tiny_gguf: Path) -> Path:
    return tiny_gguf


@pytest.fixture(params=["real", "fake"])
def engine(request: pytest.FixtureRequest, gguf_path: Path) -> Iterable[EngineProtocol]:
    if request.param == "real":  # flash attention off: no short-batch padding, so reuse counts are exact
        eng: EngineProtocol = Engine(EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, n_batch=64,
                                                  n_ubatch=64, flash_attn=False))
    else:
        eng = FakeEngine(n_ctx=N_CTX)
    yield eng
    eng.close()


# -- members and signatures -------------------------------------------------------------------------------------
def test_engine_members_match_the_protocol(engine: EngineProtocol) -> None:
    assert isinstance(engine, EngineProtocol)
    assert contract_problems(engine, EngineProtocol) == []


def test_both_engines_hold_several_sequences(gguf_path: Path) -> None:
    with Engine(EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, n_seq=2)) as real:
        fake = FakeEngine(n_ctx=N_CTX, n_seq=2)
        for eng in (real, fake):
            assert contract_problems(eng, EngineProtocol) == []
            assert (eng.n_seq, eng.n_ctx_seq) == (2, N_CTX // 2)


def test_the_contract_check_catches_a_mismatch() -> None:
    """Negative control: an engine that drifted from the protocol is reported, member by member."""

    def missing(self: object) -> None:
        raise AttributeError("token_text")

    class Drifted(FakeEngine):
        token_text = property(missing)  # type: ignore[assignment]

        def plan_prompt(self, seq: int, prompt_tokens: list[int], *, chunk: int = 256,  # type: ignore[override]
                        sample: bool = True) -> PromptPlan:
            return PromptPlan(0, [])

        def decode(self, feeds: Sequence[Feed], extra: int) -> None:  # type: ignore[override]
            pass

    drifted = Drifted(n_ctx_train="4096")  # type: ignore[arg-type]
    assert contract_problems(drifted, EngineProtocol) == [
        "n_ctx_train: '4096' is not <class 'int'>",
        "token_text: missing",
        "plan_prompt: 'chunk' defaults to 256, not 512",
        "plan_prompt: no parameter 'pad_short_batches'",
        "decode: extra parameter 'extra' without a default",
    ]


# -- behaviour, through the decode loop ----------------------------------------------------------------------------
def run(engine: EngineProtocol, prompt: list[int], params: GenerationParams = GenerationParams(GREEDY, max_tokens=12),
        **kw: object) -> tuple[list, Finished]:
    events = list(generate(engine, Request(prompt, params), **kw))  # type: ignore[arg-type]
    return events, events[-1]


def test_generate_streams_progress_then_text_then_one_finished(engine: EngineProtocol) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    events, fin = run(engine, prompt, prefill_chunk=16)
    kinds = [type(e) for e in events]
    assert kinds == sorted(kinds, key=[PrefillProgress, TextChunk, Finished].index)
    assert kinds.count(Finished) == 1 and isinstance(fin, Finished)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [p.done for p in progress] == [min(i + 16, len(prompt)) for i in range(0, len(prompt), 16)]
    assert {p.total for p in progress} == {len(prompt)}
    assert fin.prompt_tokens == len(prompt) and fin.reused_tokens == 0
    assert len(fin.tokens) == fin.completion_tokens > 0
    # every sampled token but the last is in the cache (nothing reads the last one's logits)
    assert engine.cached_tokens == prompt + list(fin.tokens[:-1])
    streamed = sum(e.n_tokens for e in events if isinstance(e, TextChunk))
    assert streamed == fin.completion_tokens - (fin.reason == "stop")
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == engine.detokenize(fin.tokens[:streamed])


def test_a_follow_up_reuses_everything_cached(engine: EngineProtocol) -> None:
    first = engine.tokenize(TEXT, add_bos=True)
    run(engine, first)
    cached = engine.cached_tokens
    follow_up = cached + engine.tokenize(" And then?")
    events, fin = run(engine, follow_up)
    assert fin.reused_tokens == len(cached)
    assert [e for e in events if isinstance(e, PrefillProgress)][-1].total == len(follow_up) - len(cached)
    _, again = run(engine, follow_up)  # the same prompt again: only its last token is evaluated
    assert again.reused_tokens == len(follow_up) - 1


def test_a_cancelled_prefill_keeps_what_was_evaluated(engine: EngineProtocol) -> None:
    tokens = engine.tokenize(TEXT * 2, add_bos=True)
    cancel = threading.Event()
    for event in prefill(engine, tokens, cancel=cancel, chunk=8):
        if isinstance(event, PrefillProgress) and event.done == 16:
            cancel.set()
    assert event == Finished("cancelled", len(tokens), 0, 0, event.time_to_first_token_s,
                             event.prefill_tokens_per_s, 0.0)
    assert engine.cached_tokens == tokens[:16]
    assert list(prefill(engine, tokens, chunk=8))[-1].reused_tokens == 16
    assert engine.cached_tokens == tokens
    _, fin = run(engine, tokens + engine.tokenize(" Go."), cancel=cancel)
    assert fin.reason == "cancelled" and fin.completion_tokens == 0


def test_max_tokens_and_limits(engine: EngineProtocol) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    _, fin = run(engine, prompt, GenerationParams(GREEDY, max_tokens=3, ignore_eos=True))
    assert fin.reason == "length" and fin.completion_tokens == 3
    with pytest.raises(EngineError, match=f"do not fit the {N_CTX}-token context"):
        run(engine, [prompt[1]] * N_CTX)
    with pytest.raises(ValueError):
        run(engine, [])


def test_state_files(engine: EngineProtocol, tmp_path: Path) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    run(engine, prompt)
    saved = engine.cached_tokens
    assert len(saved) > len(prompt)
    engine.save_state(tmp_path / "s.state")
    run(engine, engine.tokenize("Something else entirely.", add_bos=True))
    assert engine.cached_tokens != saved
    assert engine.load_state(tmp_path / "s.state") == len(saved)
    assert engine.cached_tokens == saved
    _, fin = run(engine, saved + engine.tokenize(" More?"))
    assert fin.reused_tokens == len(saved)
    with pytest.raises(EngineError, match="no such session state file"):
        engine.load_state(tmp_path / "missing.state")
    (tmp_path / "bad.state").write_bytes(b"not a state")
    with pytest.raises(EngineError, match="not a session state"):
        engine.load_state(tmp_path / "bad.state")


def test_tokenizer(engine: EngineProtocol) -> None:
    assert engine.detokenize(engine.tokenize(TEXT)) == TEXT
    special = engine.special_tokens()
    assert {"bos", "eos", "eot"} >= set(special) and "bos" in special
    assert engine.tokenize(TEXT, add_bos=True)[0] == special["bos"]
    assert engine.tokenize(TEXT, add_bos=True)[1:] == engine.tokenize(TEXT)
    assert engine.tokenize(engine.token_text(special["eot"]), special=True) == [special["eot"]]
    assert special["eot"] not in engine.tokenize(engine.token_text(special["eot"]), special=False)


def test_context_manager_closes(engine: EngineProtocol) -> None:
    with engine as entered:
        assert entered is engine
    engine.close()  # twice is fine
