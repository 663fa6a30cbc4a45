"""lcrun.engine.runtime against a real tiny Llama GGUF, generating through lcrun.generation's decode loop as every front
end does: parity with llama-cpp-python (tokens, parameters, metadata, tokenizer, logits of a YaRN model), KV prefix
reuse, chunked prefill with progress and cancellation, limits, stop strings, session state files, UTF-8-safe
streaming, long token pieces, one-line load errors, devices, a quiet llama.cpp log and the version warning. Several
sequences: tests/test_engine_sequences.py; the interface: tests/test_engine_contract.py."""
from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest

from lcrun.convert.convert import convert_checkpoint
from lcrun.engine.protocol import GREEDY, Feed, Sampling
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.errors import EngineError
from lcrun.generation.drive import generate, prefill
from lcrun.generation.records import Finished, GenerationParams, PrefillProgress, Request, TextChunk
from tests.fixtures.checkpoint_factory import make_llama_checkpoint

N_CTX = 512
TWELVE = GenerationParams(GREEDY, max_tokens=12)
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 日本語 text, numbers 12345 and more words follow here."


@pytest.fixture(scope="module")
def gguf_path(tiny_gguf: Path) -> Path:
    return tiny_gguf


def make_config(path: Path) -> EngineConfig:
    # flash attention off: with it on, a CPU engine re-evaluates cached tokens to avoid short batches (tested apart,
    # in test_cpu_flash_attention_never_decodes_a_short_batch), and these tests count reused tokens exactly
    return EngineConfig(model_path=path, n_ctx=N_CTX, n_threads=2, n_batch=64, n_ubatch=64, flash_attn=False)


@pytest.fixture
def engine(gguf_path: Path) -> Iterable[Engine]:
    eng = Engine(make_config(gguf_path))
    yield eng
    eng.close()


def run(engine: Engine, prompt: list[int], params: GenerationParams = TWELVE, **kw) -> tuple[list, Finished]:
    events = list(generate(engine, Request(prompt, params), **kw))
    assert isinstance(events[-1], Finished)
    assert not any(isinstance(e, Finished) for e in events[:-1])
    return events, events[-1]


def completion_tokens(engine: Engine, prompt: list[int], fin: Finished) -> list[int]:
    """What was generated; the cache holds all of it but the last token (sampled, never decoded)."""
    assert engine.cached_tokens == prompt + list(fin.tokens[:-1])
    assert len(fin.tokens) == fin.completion_tokens
    return list(fin.tokens)


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


@pytest.mark.parametrize(("frequency", "presence"), [(0.0, 0.0), (1.5, 0.0), (0.0, 1.5), (0.7, 0.9)])
def test_greedy_matches_llama_cpp_python(engine: Engine, gguf_path: Path, frequency: float, presence: float) -> None:
    import llama_cpp

    prompt = engine.tokenize(TEXT, add_bos=True)
    sampling = replace(GREEDY, frequency_penalty=frequency, presence_penalty=presence)
    events, fin = run(engine, prompt, GenerationParams(sampling, max_tokens=24))
    ours = completion_tokens(engine, prompt, fin)
    if frequency or presence:  # the penalties take effect (else the comparison below would not test them)
        _, plain = run(engine, prompt, GenerationParams(GREEDY, max_tokens=24))
        assert completion_tokens(engine, prompt, plain) != ours

    direct = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=N_CTX, n_threads=2, n_batch=64, n_ubatch=64,
                             flash_attn=False, yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0,
                             verbose=False)
    try:
        theirs = []
        for tok in direct.generate(prompt, temp=0.0, top_k=40, top_p=1.0, min_p=0.05, repeat_penalty=1.0,
                                   frequency_penalty=frequency, presence_penalty=presence):
            theirs.append(tok)
            if len(theirs) == len(ours):  # an end-of-generation token ends ours: it is the last of both
                break
    finally:
        direct.close()
    assert ours == theirs
    assert fin.prompt_tokens == len(prompt) and fin.reused_tokens == 0
    assert fin.reason in ("stop", "length")


def test_prefix_reuse_evaluates_only_new_tokens(engine: Engine, gguf_path: Path) -> None:
    first = engine.tokenize(TEXT, add_bos=True)
    _, fin1 = run(engine, first)
    answer = completion_tokens(engine, first, fin1)
    second = first + answer + engine.tokenize(" And then the story continues.")

    events, fin2 = run(engine, second)
    prefix = len(first) + len(answer) - 1  # the answer's last token was never decoded
    assert fin2.reused_tokens == prefix
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert progress[-1].total == len(second) - prefix
    tokens_reused = completion_tokens(engine, second, fin2)

    with Engine(make_config(gguf_path)) as fresh:
        _, fin_fresh = run(fresh, second)
        assert fin_fresh.reused_tokens == 0
        assert completion_tokens(fresh, second, fin_fresh) == tokens_reused


def test_identical_prompt_reevaluates_only_last_token(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    _, fin1 = run(engine, prompt)
    first = completion_tokens(engine, prompt, fin1)
    events, fin2 = run(engine, prompt)
    assert fin2.reused_tokens == len(prompt) - 1
    assert [e for e in events if isinstance(e, PrefillProgress)] == [PrefillProgress(1, 1)]
    assert completion_tokens(engine, prompt, fin2) == first


def test_prefill_progress_covers_prompt_once(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT * 3, add_bos=True)
    events, _ = run(engine, prompt, GenerationParams(GREEDY, max_tokens=1), prefill_chunk=16)
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert [p.done for p in progress] == [min(i + 16, len(prompt)) for i in range(0, len(prompt), 16)]
    assert {p.total for p in progress} == {len(prompt)}
    # every progress record comes before any text
    last_progress = max(i for i, e in enumerate(events) if isinstance(e, PrefillProgress))
    assert all(not isinstance(e, TextChunk) for e in events[:last_progress])


def test_cancel_mid_prefill_then_engine_still_works(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT * 3, add_bos=True)
    cancel = threading.Event()
    events = []
    for event in generate(engine, Request(prompt, TWELVE), cancel=cancel, prefill_chunk=16):
        events.append(event)
        if isinstance(event, PrefillProgress) and event.done == 32:
            cancel.set()
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "cancelled" and fin.completion_tokens == 0
    assert not any(isinstance(e, TextChunk) for e in events)
    assert len(engine.cached_tokens) == 32

    _, after = run(engine, prompt)
    assert after.reused_tokens == 32
    cached_answer = completion_tokens(engine, prompt, after)
    _, again = run(engine, prompt)
    assert completion_tokens(engine, prompt, again) == cached_answer


def test_max_tokens_respected(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    events, fin = run(engine, prompt, GenerationParams(GREEDY, max_tokens=3))
    assert fin.completion_tokens <= 3
    assert sum(e.n_tokens for e in events if isinstance(e, TextChunk)) <= 3
    if fin.reason == "length":
        assert fin.completion_tokens == 3


def test_a_stop_string_ends_the_reply_before_it(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    events, whole = run(engine, prompt, GenerationParams(GREEDY, max_tokens=24, ignore_eos=True))
    text = text_of(events)
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    cut = text[: text.index(stop)]
    events, stopped = run(engine, prompt, GenerationParams(GREEDY, max_tokens=24, ignore_eos=True, stop=(stop,)))
    assert (text_of(events), stopped.reason, stopped.stop) == (cut, "stop", stop)
    assert stopped.completion_tokens < whole.completion_tokens


def test_save_and_load_state_restores_prefix(engine: Engine, gguf_path: Path, tmp_path: Path) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    _, fin = run(engine, prompt)
    saved = engine.cached_tokens
    state = tmp_path / "session.state"
    engine.save_state(state)
    assert state.is_file() and not list(tmp_path.glob("session.state*.partial"))  # partials are named by their writer

    follow_up = saved + engine.tokenize(" Next question?")
    _, expected = run(engine, follow_up)
    expected_tokens = completion_tokens(engine, follow_up, expected)

    with Engine(make_config(gguf_path)) as restored:
        assert restored.load_state(state) == len(saved)
        assert restored.cached_tokens == saved
        _, fin2 = run(restored, follow_up)
        assert fin2.reused_tokens == len(saved)
        assert completion_tokens(restored, follow_up, fin2) == expected_tokens


def test_streamed_text_is_utf8_safe(engine: Engine) -> None:
    prompt = engine.tokenize(TEXT, add_bos=True)
    sampling = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    events, fin = run(engine, prompt, GenerationParams(sampling, max_tokens=60))
    generated = completion_tokens(engine, prompt, fin)
    if fin.reason == "stop":
        generated = generated[:-1]
    assert text_of(events) == engine.detokenize(generated)
    assert sum(e.n_tokens for e in events if isinstance(e, TextChunk)) == len(generated)
    assert fin.completion_tokens > 0 and fin.gen_tokens_per_s >= 0 and fin.time_to_first_token_s > 0


def test_detokenize_roundtrip(engine: Engine) -> None:
    assert engine.detokenize(engine.tokenize(TEXT)) == TEXT


def test_cpu_flash_attention_never_decodes_a_short_batch(gguf_path: Path) -> None:
    """A 2-63-token batch takes llama.cpp's slow CPU flash-attention path: a short new suffix is padded with cached
    tokens to 64 and a prefill's short last chunk borrows from the one before. The answers stay the same."""
    from lcrun.engine.step import CPU_FA_TILE

    config = EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, n_batch=128, n_ubatch=128, flash_attn=True)
    sizes: list[int] = []
    fa, fresh = Engine(config), Engine(config)
    try:
        original = fa.decode

        def spy(feeds: list[Feed]) -> None:
            sizes.extend(len(feed.tokens) for feed in feeds)
            original(feeds)

        fa.decode = spy  # type: ignore[method-assign]
        base = fa.tokenize(TEXT * 4, add_bos=True)[:150]           # 128 + 22 would end on a short batch
        list(prefill(fa, base))
        assert sizes == [150 - CPU_FA_TILE, CPU_FA_TILE]
        sizes.clear()
        question = base + fa.tokenize(" and a question?")
        assert len(question) - len(base) < CPU_FA_TILE
        _, fin = run(fa, question)
        assert sizes[0] == CPU_FA_TILE and fin.reused_tokens == len(question) - CPU_FA_TILE
        # negative control: evaluated from scratch (no reuse, no padding) the answer is the same
        _, fin_fresh = run(fresh, question)
        assert fin_fresh.reused_tokens == 0
        assert completion_tokens(fresh, question, fin_fresh) == completion_tokens(fa, question, fin)
    finally:
        fa.close()
        fresh.close()

    plain = Engine(EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, n_batch=128, n_ubatch=128,
                                flash_attn=False))
    try:  # without flash attention there is no slow path: nothing is evaluated twice
        list(prefill(plain, base))
        _, fin_plain = run(plain, question)
        assert fin_plain.reused_tokens == len(base)
    finally:
        plain.close()


# -- what the engine hands llama.cpp, and what it reads back ----------------------------------------------------------
def struct_fields(struct: object, skip: set[str]) -> dict[str, object]:
    names = [name for name, _ in type(struct)._fields_]  # type: ignore[attr-defined]
    return {name: getattr(struct, name) for name in names if name not in skip}


def test_parameters_are_llama_cpp_pythons_but_yarn(gguf_path: Path) -> None:
    """Field by field, the structs the engine builds are those llama-cpp-python's Llama builds for the same settings,
    except the three YaRN factors: -1 ("the GGUF's") where Llama passes 1/32/1."""
    import llama_cpp

    from lcrun.engine.params import context_params, model_params

    config = EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, n_batch=64, n_ubatch=64, flash_attn=True,
                          type_k="q8_0", type_v="q8_0", rope_freq_base=20000.0)
    direct = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=N_CTX, n_threads=2, n_batch=64, n_ubatch=64,
                             flash_attn=True, type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0,
                             rope_freq_base=20000.0, verbose=False)
    try:
        pointers = {"cb_eval", "cb_eval_user_data", "abort_callback", "abort_callback_data", "samplers", "ctx_other"}
        ours, theirs = struct_fields(context_params(config), pointers), struct_fields(direct.context_params, pointers)
        differ = {name for name in ours if ours[name] != theirs[name]}
        assert differ == {"yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow"}
        assert [ours[n] for n in sorted(differ)] == [-1.0, -1.0, -1.0]
        assert [theirs[n] for n in sorted(differ)] == [1.0, 32.0, 1.0]
        pointers = {"devices", "tensor_buft_overrides", "tensor_split", "progress_callback",
                    "progress_callback_user_data", "kv_overrides"}
        assert struct_fields(model_params(config), pointers) == struct_fields(direct.model_params, pointers)
    finally:
        direct.close()


def test_metadata_and_training_context(engine: Engine, gguf_path: Path) -> None:
    import gguf
    import llama_cpp

    direct = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=N_CTX, verbose=False)
    try:
        assert engine.metadata == direct.metadata  # every key/value llama.cpp reads, as strings
    finally:
        direct.close()
    reader = gguf.GGUFReader(gguf_path)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue  # header fields; llama.cpp leaves arrays (tokens, merges) out
        value = field.contents()
        got = engine.metadata[name]
        if isinstance(value, str):
            assert got == value
        elif isinstance(value, bool):
            assert got == str(value).lower()
        else:
            assert float(got) == pytest.approx(value, rel=1e-6), name
    assert "tokenizer.chat_template" in engine.metadata and engine.chat_template == engine.metadata[
        "tokenizer.chat_template"]
    assert engine.n_ctx_train == 2048 == int(engine.metadata["llama.context_length"])


def test_tokenizer_matches_llama_cpp_python_on_a_long_text(engine: Engine, gguf_path: Path) -> None:
    import llama_cpp

    text = (TEXT + " <|eot_id|>\n") * 400
    direct = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=N_CTX, verbose=False, vocab_only=True)
    try:
        for special in (True, False):
            ours = engine.tokenize(text, special=special, add_bos=True)
            assert ours == direct.tokenize(text.encode(), add_bos=True, special=special)
            assert len(ours) > 10_000
    finally:
        direct.close()


def write_long_piece_gguf(path: Path, piece: str) -> int:
    """A one-block byte-level BPE llama whose last token is `piece`; return its id."""
    import gguf
    import numpy as np

    from tests.fixtures.gguf_llama import add_llama_hparams

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    tokens = [chr(b) if b in printable else chr(next(extra)) for b in range(256)] + [piece]
    w = gguf.GGUFWriter(path, "llama")
    add_llama_hparams(w, n_ctx=256, n_embd=64, n_layer=1, n_ff=128, n_head=2, n_head_kv=2, head_dim=32,
                      n_vocab=len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.NORMAL)] * len(tokens))
    w.add_token_merges(["a a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), 64)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(64, dtype=np.float32))
    for name, shape in (("attn_q", (64, 64)), ("attn_k", (64, 64)), ("attn_v", (64, 64)), ("attn_output", (64, 64)),
                        ("ffn_gate", (128, 64)), ("ffn_up", (128, 64)), ("ffn_down", (64, 128))):
        w.add_tensor(f"blk.0.{name}.weight", (rng.standard_normal(shape) * 0.05).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(tokens) - 1


def test_long_pieces_come_back_whole(tmp_path: Path) -> None:
    import llama_cpp

    piece = "x" * 300
    path = tmp_path / "long-piece.gguf"
    token = write_long_piece_gguf(path, piece)
    with Engine(EngineConfig(model_path=path, n_ctx=256, n_threads=2)) as eng:
        assert eng.token_text(token) == piece
        assert eng.detokenize([token, token]) == piece * 2
        assert eng.token_bytes(token) == piece.encode()
    direct = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, vocab_only=True)
    try:  # negative control: llama-cpp-python's 32-byte buffer loses it
        assert direct.detokenize([token]) != piece.encode()
    finally:
        direct.close()


def test_yarn_model_computes_what_llama_cpp_python_does(tmp_path: Path) -> None:
    """A YaRN-scaled model beyond its original context: the engine's logits are those of llama-cpp-python with the
    YaRN factors at -1. (llama.cpp's llama architecture reads no YaRN beta/attention keys from the file, so -1 and
    Llama's 1/32/1 agree here; the comparison itself tells YaRN settings apart, see the control.)"""
    import llama_cpp
    import numpy as np

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 8.0,
            "beta_slow": 2.0}
    ck = make_llama_checkpoint(tmp_path / "ckpt", hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, rope=rope,
                               max_position_embeddings=512)
    path = convert_checkpoint(ck.path, tmp_path / "yarn.gguf", outtype="f16").paths[0]
    with Engine(EngineConfig(model_path=path, n_ctx=N_CTX, n_threads=2, flash_attn=False)) as eng:
        assert eng.metadata["llama.rope.scaling.type"] == "yarn"
        prompt = eng.tokenize(TEXT * 6, add_bos=True)[:300]
        list(prefill(eng, prompt[:-1]))
        eng.decode([Feed(0, prompt[-1:])])
        ours = eng.logits(0)

    def direct_logits(**yarn: float) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=2, flash_attn=False, verbose=False, **yarn)
        try:
            llm.eval(prompt)
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        finally:
            llm.close()

    theirs = direct_logits(yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    other = direct_logits(yarn_beta_fast=8.0, yarn_beta_slow=2.0)  # control: other YaRN values show
    assert np.abs(other - theirs).max() > 0.1 * np.abs(theirs).max()


# -- errors, log, version ---------------------------------------------------------------------------------------------
def test_load_errors_are_one_line(gguf_path: Path, tmp_path: Path) -> None:
    def error(**kw: object) -> str:
        base = dict(model_path=gguf_path, n_ctx=N_CTX, n_threads=2)
        with pytest.raises(EngineError) as info:
            Engine(EngineConfig(**{**base, **kw}))  # type: ignore[arg-type]
        message = str(info.value)
        assert "\n" not in message
        return message

    assert error(model_path=tmp_path / "missing.gguf") == f"{tmp_path / 'missing.gguf'}: no such model file"
    (tmp_path / "junk.gguf").write_bytes(b"junk" * 100)
    assert error(model_path=tmp_path / "junk.gguf").startswith(
        f"{tmp_path / 'junk.gguf'}: llama.cpp could not load the model (invalid magic characters")
    assert error(type_k="q9_9") == "q9_9: not a ggml type for the KV cache (try f16, q8_0, q4_0)"
    assert error(type_v="q8_0", flash_attn=False) == (
        f"{gguf_path}: llama.cpp could not create a 512-token context "
        "(quantized V cache requires flash_attn to be enabled)")
    assert error(n_seq=1000) == "1000 sequences: llama.cpp holds 1 to 256 in one context"
    assert error(devices=("NPU9",)) == "NPU9: no such ggml device (llama.cpp has: CPU)"


def test_devices_are_chosen_by_name(gguf_path: Path) -> None:
    from lcrun.engine.backends import list_devices

    assert [d.name for d in list_devices() if d.kind == "cpu"] == ["CPU"]
    answers = []
    for devices in (None, (), ("CPU",)):
        with Engine(EngineConfig(model_path=gguf_path, n_ctx=N_CTX, n_threads=2, flash_attn=False,
                                 devices=devices)) as eng:
            prompt = eng.tokenize(TEXT, add_bos=True)
            _, fin = run(eng, prompt)
            answers.append(completion_tokens(eng, prompt, fin))
    assert answers[0] == answers[1] == answers[2]


QUIET_SCRIPT = """
import sys
from pathlib import Path
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.generation.drive import generate
from lcrun.generation.records import GenerationParams, Request
with Engine(EngineConfig(model_path=Path(sys.argv[1]), n_ctx=256, n_threads=2)) as engine:
    list(generate(engine, Request(engine.tokenize("Hello there", add_bos=True), GenerationParams(max_tokens=4))))
    try:
        Engine(EngineConfig(model_path=Path(sys.argv[2]), n_ctx=256))
    except Exception as exc:
        print(type(exc).__name__)
"""


def test_llama_cpp_stays_quiet(gguf_path: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "junk.gguf").write_bytes(b"junk" * 100)
    args = [sys.executable, "-c", QUIET_SCRIPT, str(gguf_path), str(tmp_path / "junk.gguf")]
    env = {k: v for k, v in os.environ.items() if k != "LCRUN_DEBUG"}
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "EngineError\n", "")
    loud = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**env, "LCRUN_DEBUG": "1"})
    assert loud.returncode == 0 and "llama_model_loader" in loud.stderr and "invalid magic" in loud.stderr


def test_another_llama_cpp_python_version_warns_once(gguf_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import llama_cpp

    from lcrun.engine import library

    monkeypatch.setattr(library, "started", {"backend"})
    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")
    for _ in range(2):
        Engine(EngineConfig(model_path=gguf_path, n_ctx=256, n_threads=2)).close()
    assert capsys.readouterr().err == (
        f"warning: lcrun's engine mirrors llama-cpp-python {library.LLAMA_CPP_PYTHON_VERSION} but 0.3.99 is "
        "installed; its C structs or defaults may differ\n")
    monkeypatch.setattr(library, "started", {"backend"})
    monkeypatch.setattr(llama_cpp, "__version__", library.LLAMA_CPP_PYTHON_VERSION)
    Engine(EngineConfig(model_path=gguf_path, n_ctx=256, n_threads=2)).close()
    assert capsys.readouterr().err == ""  # control: the mirrored version says nothing


REPACK_SCRIPT = """
import sys
from pathlib import Path
from lcrun.engine.protocol import GREEDY
from lcrun.engine.runtime import Engine, EngineConfig
from lcrun.generation.drive import generate
from lcrun.generation.records import GenerationParams, Request
repack = {"auto": None, "on": True, "off": False}[sys.argv[2]]
with Engine(EngineConfig(model_path=Path(sys.argv[1]), n_ctx=256, n_threads=2, repack=repack)) as engine:
    prompt = engine.tokenize("hello world " * 20)
    events = list(generate(engine, Request(prompt, GenerationParams(GREEDY, max_tokens=4))))
print(events[-1].completion_tokens)
"""


def test_quantized_weights_load_and_generate_with_the_default_repacking(tmp_path: Path) -> None:
    """llama.cpp's AMX matmul crashes on quantized weights (ggml-org/llama.cpp#20824); where this llama.cpp would use
    it, the engine does not repack unless told to. Each run is its own process: the crash is a segfault."""
    import subprocess
    import sys

    from lcrun.engine.params import amx_build, model_params

    ck = make_llama_checkpoint(tmp_path / "ckpt", hidden=128, layers=2, heads=4, kv_heads=2, ffn=256)
    q8 = convert_checkpoint(ck.path, tmp_path / "q8.gguf", outtype="q8_0").paths[0]
    config = EngineConfig(model_path=q8, n_ctx=256)
    assert model_params(config).use_extra_bufts is (not amx_build())
    assert model_params(replace(config, repack=True)).use_extra_bufts is True
    assert model_params(replace(config, repack=False)).use_extra_bufts is False

    def run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", REPACK_SCRIPT, str(q8), mode], capture_output=True, text=True,
                              timeout=120)

    for mode in ("auto", "off"):
        done = run(mode)
        assert (done.returncode, done.stdout) == (0, "4\n"), done.stderr
    if amx_build():  # the negative control: forcing the repack into AMX reproduces the crash the default avoids
        assert run("on").returncode != 0
    else:
        assert run("on").stdout == "4\n"
