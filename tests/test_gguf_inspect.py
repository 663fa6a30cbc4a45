"""lcrun.gguf_inspect against real GGUF files written by gguf's GGUFWriter: tiny Llama-3-shaped models (head_dim 128,
so rope_freqs has Llama 3.1's 64 entries), split sets, and files damaged on purpose."""
from __future__ import annotations

import io
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from rich.console import Console

from lcrun.errors import GGUFFileError
from lcrun.gguf_inspect import GGUFReport, inspect_gguf
from lcrun.ui.inspect_view import render_inspect

HEAD_DIM = 128
N_HEAD, N_HEAD_KV, N_LAYER, N_FF = 2, 1, 2, 64
N_EMBD = N_HEAD * HEAD_DIM
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "[INST]", "<|eom_id|>", "<|eot_id|>"]
TOKENS = [chr(c) for c in range(ord("a"), ord("a") + 27)] + SPECIALS  # 32 tokens
BOS, EOS, EOM, EOT = (TOKENS.index(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>"
            "{% endfor %}")


def llama3_rope_factors(theta: float = 500000.0, head_dim: int = HEAD_DIM, factor: float = 8.0, low: float = 1.0,
                        high: float = 4.0, original: int = 8192) -> np.ndarray:
    """MODEL_FACTS.md, 'RoPE → GGUF', written out independently of lcrun.convert."""
    out = []
    for i in range(head_dim // 2):
        wavelength = 2 * math.pi / theta ** (-2 * i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


@dataclass
class Spec:
    name: str = "Llama 3.1 8B Instruct"
    context_length: int = 131072
    freq_base: float = 500000.0
    rope_freqs: np.ndarray | None = field(default_factory=llama3_rope_factors)
    scaling: dict[str, Any] | None = None
    eot_id: int | None = EOT
    eos_id: int = EOS
    chat_template: bool = True
    tokenizer_model: str = "gpt2"
    pre: str | None = "llama-bpe"
    extra: dict[str, str] = field(default_factory=dict)


def tensors(spec: Spec) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]]:
    rng = np.random.default_rng(0)

    def f16(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    q8_0 = gguf.GGMLQuantizationType.Q8_0
    embd = rng.standard_normal((len(TOKENS), N_EMBD)).astype(np.float32)
    out: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = [
        ("token_embd.weight", gguf.quants.quantize(embd, q8_0), q8_0),
    ]
    for i in range(N_LAYER):
        out += [
            (f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32), None),
            (f"blk.{i}.attn_q.weight", f16(N_EMBD, N_EMBD), None),
            (f"blk.{i}.attn_k.weight", f16(N_HEAD_KV * HEAD_DIM, N_EMBD), None),
            (f"blk.{i}.attn_v.weight", f16(N_HEAD_KV * HEAD_DIM, N_EMBD), None),
            (f"blk.{i}.attn_output.weight", f16(N_EMBD, N_EMBD), None),
            (f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32), None),
            (f"blk.{i}.ffn_gate.weight", f16(N_FF, N_EMBD), None),
            (f"blk.{i}.ffn_up.weight", f16(N_FF, N_EMBD), None),
            (f"blk.{i}.ffn_down.weight", f16(N_EMBD, N_FF), None),
        ]
    out += [("output_norm.weight", np.ones(N_EMBD, np.float32), None),
            ("output.weight", f16(len(TOKENS), N_EMBD), None)]
    if spec.rope_freqs is not None:
        out.append(("rope_freqs.weight", spec.rope_freqs, None))
    return out


def n_params(spec: Spec) -> int:
    return sum(int(np.prod(raw.shape)) if qtype is None else len(TOKENS) * N_EMBD for _, raw, qtype in tensors(spec))


def write_gguf(path: Path, spec: Spec | None = None, *, split_max_tensors: int = 0) -> Path:
    spec = spec or Spec()
    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    w.add_name(spec.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_source_repo_url("https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct")
    w.add_context_length(spec.context_length)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_block_count(N_LAYER)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(spec.freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in (spec.scaling or {}).items():
        getattr(w, f"add_rope_scaling_{key}")(value)
    w.add_tokenizer_model(spec.tokenizer_model)
    if spec.pre is not None:
        w.add_tokenizer_pre(spec.pre)
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in TOKENS])
    w.add_token_merges(["a b", "c d"])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(spec.eos_id)
    if spec.eot_id is not None:
        w.add_eot_token_id(spec.eot_id)
    w.add_eom_token_id(EOM)
    w.add_add_bos_token(True)
    if spec.chat_template:
        w.add_chat_template([{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": TEMPLATE}])
    w.add_string("lcrun.converter", "lcrun convert")
    for key, value in spec.extra.items():
        w.add_string(key, value)
    for name, data, qtype in tensors(spec):
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def warned(report: GGUFReport, pattern: str) -> bool:
    return any(re.search(pattern, w) for w in report.warnings)


# ---- a correct Llama 3.1 file: every field read back, no warning at all -------------------------------------------

def test_correct_llama31_file_reports_everything_and_warns_nothing(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "llama31.gguf")
    r = inspect_gguf(path)

    assert r.warnings == []
    assert (r.path, r.paths, r.split_count, r.file_size) == (path, [path], 1, path.stat().st_size)
    assert (r.architecture, r.name, r.file_type, r.gguf_version) == ("llama", "Llama 3.1 8B Instruct", "F16", 3)
    assert (r.context_length, r.embedding_length, r.feed_forward_length) == (131072, N_EMBD, N_FF)
    assert r.block_count == N_LAYER
    assert (r.head_count, r.head_count_kv, r.head_dim) == (N_HEAD, N_HEAD_KV, HEAD_DIM)
    assert r.parameter_count == n_params(Spec())
    assert r.size_label == gguf.size_label(r.parameter_count, r.parameter_count, 0, 0)
    assert r.tensor_count == 4 + 9 * N_LAYER
    assert {k: v.count for k, v in r.tensor_types.items()} == {"F16": 1 + 7 * N_LAYER, "F32": 2 + 2 * N_LAYER,
                                                               "Q8_0": 1}
    assert r.tensor_types["Q8_0"].bytes == len(TOKENS) * N_EMBD // 32 * 34
    assert sum(v.bytes for v in r.tensor_types.values()) < r.file_size

    rope = r.rope
    assert (rope.freq_base, rope.dimension_count, rope.scaling_type, rope.yarn) == (500000.0, HEAD_DIM, None, {})
    assert (rope.freqs_present, rope.freqs_length, rope.freqs_min, rope.freqs_max) == (True, 64, 1.0, 8.0)

    tok = r.tokenizer
    assert (tok.model, tok.pre, tok.vocab_size, tok.add_bos) == ("gpt2", "llama-bpe", len(TOKENS), True)
    assert (tok.bos.id, tok.bos.text) == (BOS, "<|begin_of_text|>")
    assert (tok.eos.text, tok.eot.text, tok.eom.text) == ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
    assert tok.chat_template and tok.chat_template_names == ["tool_use"]

    assert r.general["general.source.repo_url"] == "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct"
    assert r.general["general.name"] == "Llama 3.1 8B Instruct"
    assert r.lcrun == {"lcrun.converter": "lcrun convert"}


def test_rope_freqs_match_model_facts() -> None:
    factors = llama3_rope_factors()
    assert list(factors[:29]) == [1.0] * 29 and list(factors[35:]) == [8.0] * 29
    assert np.allclose(factors[29:35], [1.2075, 1.5534, 2.0263, 2.6945, 3.6843, 5.2573], atol=1e-4)


# ---- RoPE warnings ------------------------------------------------------------------------------------------------

LLAMA3_MISSING = r"^llama3-scaled model without rope_freqs"


@pytest.mark.parametrize("spec", [
    Spec(rope_freqs=None),
    Spec(rope_freqs=None, context_length=32768, name="my finetune"),
    # the name claims 3.1 though the context was left at 8K: the factors are still missing
    Spec(rope_freqs=None, context_length=8192, name="Meta-Llama-3.1-8B-Instruct"),
], ids=["llama31", "long-context-unnamed", "named-3.1"])
def test_llama3_scaled_without_rope_freqs_warns(tmp_path: Path, spec: Spec) -> None:
    r = inspect_gguf(write_gguf(tmp_path / "m.gguf", spec))
    assert r.rope.freqs_present is False and r.tensor_count == 3 + 9 * N_LAYER
    assert warned(r, LLAMA3_MISSING)


@pytest.mark.parametrize("spec", [
    Spec(),  # llama3 factors present
    Spec(rope_freqs=None, name="Llama-3-8B-Instruct-Gradient-1048k", freq_base=3580165449.0, context_length=1048576),
    Spec(rope_freqs=None, name="Meta-Llama-3-8B-Instruct", context_length=8192),
    Spec(rope_freqs=None, name="long", context_length=32768,
         scaling={"type": gguf.RopeScalingType.LINEAR, "factor": 4.0}),
    Spec(rope_freqs=None, name="yarn", context_length=32768,
         scaling={"type": gguf.RopeScalingType.YARN, "factor": 4.0, "orig_ctx_len": 8192, "yarn_beta_fast": 32.0}),
    Spec(rope_freqs=None, name="Llama-3-8B", extra={"lcrun.override.context_length_original": "8192"}),
], ids=["llama31", "gradient-plain-theta", "llama3-8k", "linear", "yarn", "lcrun-ctx-override"])
def test_llama3_scaled_warning_negative_controls(tmp_path: Path, spec: Spec) -> None:
    r = inspect_gguf(write_gguf(tmp_path / "m.gguf", spec))
    assert not warned(r, LLAMA3_MISSING), r.warnings


def test_gradient_plain_theta_reads_back(tmp_path: Path) -> None:
    spec = Spec(rope_freqs=None, name="Llama-3-8B-Instruct-Gradient-1048k", freq_base=3580165449.0,
                context_length=1048576)
    r = inspect_gguf(write_gguf(tmp_path / "gradient.gguf", spec))
    assert r.rope.freq_base == float(np.float32(3580165449.0))  # stored as f32
    assert r.context_length == 1048576 and r.rope.freqs_length is None and r.rope.scaling_type is None
    assert r.warnings == []


def test_yarn_parameters_reported(tmp_path: Path) -> None:
    spec = Spec(rope_freqs=None, scaling={"type": gguf.RopeScalingType.YARN, "factor": 4.0, "orig_ctx_len": 8192,
                                          "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0}, context_length=32768)
    r = inspect_gguf(write_gguf(tmp_path / "yarn.gguf", spec))
    assert (r.rope.scaling_type, r.rope.scaling_factor, r.rope.original_context_length) == ("yarn", 4.0, 8192)
    assert r.rope.yarn == {"yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0}


def test_rope_freqs_of_wrong_length_warns(tmp_path: Path) -> None:
    r = inspect_gguf(write_gguf(tmp_path / "m.gguf", Spec(rope_freqs=llama3_rope_factors(head_dim=64))))
    assert r.rope.freqs_length == 32
    assert warned(r, r"^rope_freqs has 32 entries, expected rope dimension/2 = 64")
    assert not warned(r, LLAMA3_MISSING)


# ---- tokenizer warnings -------------------------------------------------------------------------------------------

EOT_MISSING = r"^eos is <\|end_of_text\|> but chat turns end with <\|eot_id\|>"


def test_eos_end_of_text_without_eot_id_warns(tmp_path: Path) -> None:
    r = inspect_gguf(write_gguf(tmp_path / "m.gguf", Spec(eot_id=None)))
    assert r.tokenizer.eot is None
    assert warned(r, EOT_MISSING + rf" \({EOT}\)")


@pytest.mark.parametrize("spec", [Spec(), Spec(eot_id=None, eos_id=EOT)], ids=["eot-set", "eos-is-eot"])
def test_eos_warning_negative_controls(tmp_path: Path, spec: Spec) -> None:
    assert not warned(inspect_gguf(write_gguf(tmp_path / "m.gguf", spec)), EOT_MISSING)


def test_missing_chat_template_warns(tmp_path: Path) -> None:
    r = inspect_gguf(write_gguf(tmp_path / "m.gguf", Spec(chat_template=False)))
    assert r.tokenizer.chat_template is False and r.tokenizer.chat_template_names == []
    assert r.warnings == ["no chat template (tokenizer.chat_template): chat falls back to a guessed prompt format"]


@pytest.mark.parametrize("pre, state", [(None, "missing"), ("default", "'default'")])
def test_gpt2_vocab_without_pre_tokenizer_warns(tmp_path: Path, pre: str | None, state: str) -> None:
    r = inspect_gguf(write_gguf(tmp_path / "m.gguf", Spec(pre=pre)))
    assert r.warnings == [f"tokenizer.ggml.pre is {state} for a gpt2 BPE vocab: llama.cpp falls back to its "
                          "default pre-tokenizer and splits text unlike the model's own tokenizer"]


def test_spm_vocab_without_pre_tokenizer_is_fine(tmp_path: Path) -> None:
    assert inspect_gguf(write_gguf(tmp_path / "m.gguf", Spec(tokenizer_model="llama", pre=None))).warnings == []


# ---- split sets ---------------------------------------------------------------------------------------------------

def write_split_set(tmp_path: Path) -> list[Path]:
    write_gguf(tmp_path / "model.gguf", split_max_tensors=8)
    return sorted(tmp_path.glob("model*.gguf"))


def test_split_writer_names(tmp_path: Path) -> None:
    assert [p.name for p in write_split_set(tmp_path)] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_split_set_read_whole_from_any_split(tmp_path: Path, which: int) -> None:
    splits = write_split_set(tmp_path)
    (tmp_path / "single").mkdir()
    single = inspect_gguf(write_gguf(tmp_path / "single" / "m.gguf"))
    r = inspect_gguf(splits[which])

    assert r.path == splits[which] and r.paths == splits and r.split_count == 3
    assert r.file_size == sum(p.stat().st_size for p in splits)
    assert (r.tensor_count, r.parameter_count, r.tensor_types) == (single.tensor_count, single.parameter_count,
                                                                   single.tensor_types)
    # metadata comes from the first split, whichever one was named
    assert (r.name, r.context_length, r.tokenizer, r.rope) == (single.name, single.context_length, single.tokenizer,
                                                               single.rope)
    assert r.warnings == []


def test_incomplete_split_set_warns(tmp_path: Path) -> None:
    splits = write_split_set(tmp_path)
    splits[1].unlink()
    r = inspect_gguf(splits[0])
    assert r.paths == [splits[0], splits[2]]
    assert r.warnings == ["split set incomplete: found 2 of 3 files, missing model-00002-of-00003.gguf"]

    splits[0].unlink()
    r = inspect_gguf(splits[2])  # no first split: no model metadata (GGUFWriter puts it in split 1 only)
    assert r.paths == [splits[2]] and r.architecture is None and r.tensor_count > 0
    assert r.warnings == ["split set incomplete: found 1 of 3 files, missing model-00001-of-00003.gguf, "
                          "model-00002-of-00003.gguf"]


def test_corrupt_sibling_split_is_named(tmp_path: Path) -> None:
    splits = write_split_set(tmp_path)
    splits[2].write_bytes(splits[2].read_bytes()[:100])
    with pytest.raises(GGUFFileError) as caught:
        inspect_gguf(splits[0])
    assert str(caught.value).startswith(f"{splits[2]}: truncated")


# ---- JSON and rendering -------------------------------------------------------------------------------------------

def test_to_dict_is_json_serialisable(tmp_path: Path) -> None:
    r = inspect_gguf(write_gguf(tmp_path / "m.gguf", Spec(rope_freqs=None, eot_id=None)))
    data = json.loads(json.dumps(r.to_dict()))
    assert data["path"] == str(tmp_path / "m.gguf") and data["paths"] == [data["path"]]
    assert data["tensor_types"]["Q8_0"] == {"count": 1, "bytes": r.tensor_types["Q8_0"].bytes}
    assert data["rope"]["freq_base"] == 500000.0 and data["rope"]["freqs_present"] is False
    assert data["tokenizer"]["eos"] == {"id": EOS, "text": "<|end_of_text|>"} and data["tokenizer"]["eot"] is None
    assert len(data["warnings"]) == 2


def test_render_shows_key_facts_and_warnings(tmp_path: Path) -> None:
    console = Console(record=True, width=100)
    render_inspect(inspect_gguf(write_gguf(tmp_path / "llama31.gguf")), console)
    text = console.export_text()
    for fact in ("llama31.gguf", "Llama 3.1 8B Instruct", "context 131072", "head_dim 128", "base 500000",
                 "rope_freqs 64 factors, 1–8", "eos 28 <|end_of_text|>", "eot 31 <|eot_id|>",
                 "template yes (+ tool_use)",
                 "Q8_0", "F16", "source.repo_url", "lcrun.converter"):
        assert fact in text, fact
    assert "warning" not in text

    console = Console(record=True, width=100)
    render_inspect(inspect_gguf(write_gguf(tmp_path / "old.gguf", Spec(rope_freqs=None, chat_template=False))), console)
    text = console.export_text()
    assert "warning: llama3-scaled model without rope_freqs" in text and "plain theta" in text
    assert "warning: no chat template" in text


def test_render_is_plain_without_colour(tmp_path: Path) -> None:
    out = io.StringIO()
    render_inspect(inspect_gguf(write_gguf(tmp_path / "m.gguf", Spec(eot_id=None))),
                   Console(file=out, width=100, no_color=True, force_terminal=False))
    assert "\x1b" not in out.getvalue() and "warning: eos is <|end_of_text|>" in out.getvalue()


# ---- damaged files ------------------------------------------------------------------------------------------------

def assert_one_line_error(path: Path, problem: str) -> None:
    with pytest.raises(GGUFFileError) as caught:
        inspect_gguf(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert re.search(problem, message), message


def test_truncated_files(tmp_path: Path) -> None:
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    reader = gguf.GGUFReader(tmp_path / "good.gguf")
    data_start = reader.data_offset
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    in_an_array = reader.fields[gguf.Keys.Tokenizer.TOKEN_TYPE].offset + 60
    del reader
    cuts = [2, 4, 8, 20, 100, in_an_array, data_start // 2, data_start - 1, data_start + 1,
            (data_start + data_end) // 2, data_end - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(good[:cut])
        assert_one_line_error(path, r"truncated")
    assert "tensor data" in str(pytest.raises(GGUFFileError, inspect_gguf, tmp_path / f"cut{data_end - 1}.gguf").value)


def test_not_gguf_inputs(tmp_path: Path) -> None:
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + good[4:])
    assert_one_line_error(tmp_path / "magic.gguf", r"not a GGUF file \(starts with b'GGML'")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.gguf", r"empty file")
    (tmp_path / "dir.gguf").mkdir()
    assert_one_line_error(tmp_path / "dir.gguf", r"directory")
    assert_one_line_error(tmp_path / "absent.gguf", r"no such file")
    version = tmp_path / "version.gguf"
    version.write_bytes(good[:4] + struct.pack("<I", 99) + good[8:])
    assert_one_line_error(version, r"version 99")


def test_corrupt_array_length_fails_fast(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    key = gguf.Keys.Tokenizer.TOKEN_TYPE
    # key length (u64), key, value type (u32), item type (u32), then the array length (u64)
    length_at = reader.fields[key].offset + 8 + len(key) + 4 + 4
    del reader
    raw = bytearray(path.read_bytes())
    raw[length_at:length_at + 8] = struct.pack("<Q", 1 << 60)
    path.write_bytes(bytes(raw))
    assert_one_line_error(path, rf"truncated or corrupt header: an array at byte \d+ claims {1 << 60} entries")



# ---- the CLI: --json on stdout; a corrupt file is one "error:" line on stderr ------------------------------------

def test_cli_inspect_json_and_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lcrun.cli import main

    path = write_gguf(tmp_path / "llama31.gguf")
    try:
        main(["inspect", str(path), "--json"])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["architecture"] == "llama" and data["rope"]["freqs_length"] == HEAD_DIM // 2
    assert data["warnings"] == [] and err == ""

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(corrupt)])
    assert exit_info.value.code not in (0, None)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(f"error: {corrupt}: ")
    assert "Traceback" not in err
