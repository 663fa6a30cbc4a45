"""What a GGUF file (or a split set) says about itself, and what in it will quietly hurt long-context use.

Read with lcrun's one header reader (`lcrun.gguf_reader`), memory-mapped: only the header is parsed, the tokenizer's
big arrays are not decoded (a few token texts are looked up), and the one small tensor we look into
(`rope_freqs.weight`) is read. Anything malformed becomes a one-line `GGUFFileError` naming the file.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys, LlamaFileType, size_label

from .gguf_reader import GGUFHeader, TensorInfo, read_tensor_data
from .gguf_split import GGUFSet, read_gguf_set
from .gguf_values import GGUFArray

ROPE_FREQS = "rope_freqs.weight"
GGML_F32, GGML_F16 = 0, 1  # ggml_type numbers

LLAMA3_FREQ_BASE = 500000.0
LLAMA3_ORIGINAL_CONTEXT = 8192
LLAMA3_NAME = re.compile(r"llama[\s_-]*3\.[123]\b", re.IGNORECASE)
END_OF_TEXT = "<|end_of_text|>"
EOT_ID = "<|eot_id|>"


@dataclass(frozen=True)
class TokenRef:
    id: int
    text: str | None


@dataclass(frozen=True)
class TensorTypeStat:
    count: int
    bytes: int


@dataclass
class RopeInfo:
    freq_base: float | None = None
    dimension_count: int | None = None
    scaling_type: str | None = None
    scaling_factor: float | None = None
    original_context_length: int | None = None
    # rope.scaling.* keys beyond type/factor/original context (yarn_ext_factor, yarn_beta_fast, attn_factor, …)
    yarn: dict[str, float] = field(default_factory=dict)
    freqs_present: bool = False
    freqs_length: int | None = None
    freqs_min: float | None = None
    freqs_max: float | None = None


@dataclass
class TokenizerInfo:
    model: str | None = None
    pre: str | None = None
    vocab_size: int | None = None
    bos: TokenRef | None = None
    eos: TokenRef | None = None
    eot: TokenRef | None = None
    eom: TokenRef | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: bool = False
    chat_template_names: list[str] = field(default_factory=list)


@dataclass
class GGUFReport:
    path: Path
    paths: list[Path]
    split_count: int
    file_size: int
    gguf_version: int
    architecture: str | None
    name: str | None
    parameter_count: int
    size_label: str | None
    file_type: str | None
    tensor_count: int
    tensor_types: dict[str, TensorTypeStat]
    context_length: int | None
    embedding_length: int | None
    feed_forward_length: int | list[int] | None
    block_count: int | None
    head_count: int | list[int] | None
    head_count_kv: int | list[int] | None
    head_dim: int | None
    rope: RopeInfo
    tokenizer: TokenizerInfo
    general: dict[str, Any]
    lcrun: dict[str, Any]
    warnings: list[str]
    tensor_origins: dict[str, str] = field(default_factory=dict)   # from lcrun.tensor_origin.* (lcrun convert)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["paths"] = [str(p) for p in self.paths]
        return data


def inspect_gguf(path: Path, gguf_set: GGUFSet | None = None) -> GGUFReport:
    """The report of a GGUF (and its split set); pass `gguf_set` when the headers are already read."""
    path = Path(path)
    files = gguf_set or read_gguf_set(path)
    warnings = list(files.warnings)
    meta = files.meta.fields
    tensors = [(p, h, t) for p, h, t in files.tensors()]
    declared_tensors = meta.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if (files.split_count > 1 and not files.missing and isinstance(declared_tensors, int)
            and declared_tensors != len(tensors)):
        warnings.append(f"split set incomplete: split.tensors.count says {declared_tensors} tensors, "
                        f"the {files.split_count} files hold {len(tensors)}")

    rope_freqs = None
    for p, header, tensor in tensors:
        if tensor.name == ROPE_FREQS and tensor.ggml_type in (GGML_F32, GGML_F16):
            raw = read_tensor_data(p, header, tensor)
            dtype = np.dtype(header.byte_order + ("f4" if tensor.ggml_type == GGML_F32 else "f2"))
            rope_freqs = np.frombuffer(raw, dtype=dtype).astype(np.float32)
            break
    has_rope_freqs = any(t.name == ROPE_FREQS for _, _, t in tensors)
    report = _build_report(path, files, meta, [t for _, _, t in tensors], has_rope_freqs, rope_freqs)
    # without the first split there is no model metadata to judge, only the missing file to report
    report.warnings = warnings + (_model_warnings(report, files.meta) if files.first_found else [])
    return report


def _int_or_none(value: Any) -> Any:
    return value if isinstance(value, (int, list)) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    return f"<array of {value.length}>" if isinstance(value, GGUFArray) else value


def file_type_name(value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _build_report(path: Path, files: GGUFSet, meta: dict[str, Any], tensors: list[TensorInfo], has_rope_freqs: bool,
                  rope_freqs: np.ndarray | None) -> GGUFReport:
    arch = _str_or_none(meta.get(Keys.General.ARCHITECTURE))

    def hp(template: str) -> Any:
        return meta.get(template.format(arch=arch)) if arch else None

    types: dict[str, list[int]] = {}
    for t in tensors:
        entry = types.setdefault(t.type_name, [0, 0])
        entry[0] += 1
        entry[1] += t.n_bytes
    tensor_types = {name: TensorTypeStat(count, nbytes)
                    for name, (count, nbytes) in sorted(types.items(), key=lambda kv: -kv[1][1])}
    n_params = sum(t.n_elements for t in tensors)

    embd = _int_or_none(hp(Keys.LLM.EMBEDDING_LENGTH))
    heads = _int_or_none(hp(Keys.Attention.HEAD_COUNT))
    head_dim = _int_or_none(hp(Keys.Attention.KEY_LENGTH))
    if head_dim is None and isinstance(embd, int) and isinstance(heads, int) and heads > 0:
        head_dim = embd // heads

    rope = RopeInfo(
        freq_base=_float_or_none(hp(Keys.Rope.FREQ_BASE)),
        dimension_count=_int_or_none(hp(Keys.Rope.DIMENSION_COUNT)),
        scaling_type=_str_or_none(hp(Keys.Rope.SCALING_TYPE)),
        scaling_factor=_float_or_none(hp(Keys.Rope.SCALING_FACTOR)),
        original_context_length=_int_or_none(hp(Keys.Rope.SCALING_ORIG_CTX_LEN)),
        freqs_present=has_rope_freqs,
    )
    if arch:
        scaling_prefix = f"{arch}.rope.scaling."
        reported = {Keys.Rope.SCALING_TYPE, Keys.Rope.SCALING_FACTOR, Keys.Rope.SCALING_ORIG_CTX_LEN}
        for key, value in meta.items():
            if key.startswith(scaling_prefix) and key not in {k.format(arch=arch) for k in reported}:
                number = _float_or_none(value)
                if number is not None:
                    rope.yarn[key.removeprefix(scaling_prefix)] = number
    if rope_freqs is not None:
        rope.freqs_length = int(rope_freqs.size)
        if rope_freqs.size:
            rope.freqs_min, rope.freqs_max = float(rope_freqs.min()), float(rope_freqs.max())
    elif has_rope_freqs:
        rope.freqs_length = next(t.n_elements for t in tensors if t.name == ROPE_FREQS)

    token_list = files.meta.tokens

    def token(key: str) -> TokenRef | None:
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return TokenRef(value, files.meta.token_text(value))

    names = meta.get(Keys.Tokenizer.CHAT_TEMPLATES)
    tokenizer = TokenizerInfo(
        model=_str_or_none(meta.get(Keys.Tokenizer.MODEL)),
        pre=_str_or_none(meta.get(Keys.Tokenizer.PRE)),
        vocab_size=len(token_list) if token_list is not None else _int_or_none(hp(Keys.LLM.VOCAB_SIZE)),
        bos=token(Keys.Tokenizer.BOS_ID),
        eos=token(Keys.Tokenizer.EOS_ID),
        eot=token(Keys.Tokenizer.EOT_ID),
        eom=token(Keys.Tokenizer.EOM_ID),
        add_bos=meta.get(Keys.Tokenizer.ADD_BOS) if isinstance(meta.get(Keys.Tokenizer.ADD_BOS), bool) else None,
        add_eos=meta.get(Keys.Tokenizer.ADD_EOS) if isinstance(meta.get(Keys.Tokenizer.ADD_EOS), bool) else None,
        chat_template=isinstance(meta.get(Keys.Tokenizer.CHAT_TEMPLATE), str),
        chat_template_names=[n for n in names if isinstance(n, str)] if isinstance(names, list) else [],
    )

    return GGUFReport(
        path=path,
        paths=files.paths,
        split_count=files.split_count,
        file_size=files.file_size,
        gguf_version=files.meta.version,
        architecture=arch,
        name=_str_or_none(meta.get(Keys.General.NAME)),
        parameter_count=n_params,
        size_label=_str_or_none(meta.get(Keys.General.SIZE_LABEL)) or (size_label(n_params, n_params, 0, 0)
                                                                      if n_params else None),
        file_type=file_type_name(meta.get(Keys.General.FILE_TYPE)),
        tensor_count=len(tensors),
        tensor_types=tensor_types,
        context_length=_int_or_none(hp(Keys.LLM.CONTEXT_LENGTH)),
        embedding_length=embd,
        feed_forward_length=_int_or_none(hp(Keys.LLM.FEED_FORWARD_LENGTH)),
        block_count=_int_or_none(hp(Keys.LLM.BLOCK_COUNT)),
        head_count=heads,
        head_count_kv=_int_or_none(hp(Keys.Attention.HEAD_COUNT_KV)),
        head_dim=head_dim,
        rope=rope,
        tokenizer=tokenizer,
        general={k: _plain(v) for k, v in meta.items() if k.startswith("general.")},
        lcrun={k: _plain(v) for k, v in meta.items() if k.startswith("lcrun.") and not k.startswith(_ORIGIN)},
        warnings=[],
        tensor_origins=_tensor_origins(meta),
    )


_ORIGIN = "lcrun.tensor_origin."


def _tensor_origins(meta: Any) -> dict[str, str]:
    """What `lcrun convert` recorded about the tensors it did not copy as they were (a quantized checkpoint's)."""
    names, values = meta.get(_ORIGIN + "name"), meta.get(_ORIGIN + "value")
    arrays = (list, GGUFArray)
    if not isinstance(names, arrays) or not isinstance(values, arrays) or len(names) != len(values):
        return {}
    try:
        return {str(names[i]): str(values[i]) for i in range(min(len(names), 100_000))}
    except (TypeError, IndexError):
        return {}


def _model_warnings(report: GGUFReport, header: GGUFHeader) -> list[str]:
    meta = header.fields
    warnings: list[str] = []
    rope, tok = report.rope, report.tokenizer

    # Llama 3.1/3.2/3.3 keep Llama 3's freq_base of 500000 and reach 128K through per-frequency factors that GGUF
    # carries only as the `rope_freqs.weight` tensor; there is no metadata key for them. Converters older than
    # mid-2024 dropped the tensor, and the file still loads and chats fine below 8K. What we rely on:
    #   - the llama architecture and no rope.scaling.type (linear/yarn models scale another way);
    #   - freq_base exactly 500000 (stored as f32, exact): plain-theta extensions such as Gradient's raise the base
    #     instead, and are correct without factors;
    #   - a context beyond Llama 3's original 8192, or a name claiming Llama 3.1/3.2/3.3 (names are set by
    #     whoever converted, so only in combination with the base).
    # A context raised on purpose with `lcrun convert --ctx` records lcrun.override.context_length_original;
    # that is the user's choice, not a dropped tensor.
    context = report.context_length
    name_claims = any(isinstance(v, str) and LLAMA3_NAME.search(v) for v in
                      (report.name, meta.get(Keys.General.BASENAME), report.path.name))
    overridden = "lcrun.override.context_length_original" in meta
    if (report.architecture == "llama" and not rope.freqs_present and rope.scaling_type in (None, "none")
            and rope.freq_base is not None and math.isclose(rope.freq_base, LLAMA3_FREQ_BASE, rel_tol=1e-6)
            and not overridden
            and ((isinstance(context, int) and context > LLAMA3_ORIGINAL_CONTEXT) or name_claims)):
        warnings.append(f"llama3-scaled model without rope_freqs: freq_base 500000 with context_length {context} "
                        f"needs Llama 3.1 RoPE factors; quality degrades past {LLAMA3_ORIGINAL_CONTEXT} tokens "
                        "(reconvert with `lcrun convert`)")

    n_rot = rope.dimension_count if isinstance(rope.dimension_count, int) else report.head_dim
    if rope.freqs_present and isinstance(n_rot, int) and rope.freqs_length != n_rot // 2:
        warnings.append(f"rope_freqs has {rope.freqs_length} entries, expected rope dimension/2 = {n_rot // 2}: "
                        "llama.cpp refuses to load it")

    if tok.eos is not None and tok.eos.text == END_OF_TEXT and tok.eot is None:
        eot = header.token_id(EOT_ID)
        if eot is not None:
            warnings.append(f"eos is {END_OF_TEXT} but chat turns end with {EOT_ID} ({eot}) and no "
                            "tokenizer.ggml.eot_token_id is set: replies may run on past the end of a turn")

    if not tok.chat_template:
        warnings.append("no chat template (tokenizer.chat_template): chat falls back to a guessed prompt format")

    if tok.model == "gpt2" and tok.pre in (None, "default"):
        state = "missing" if tok.pre is None else "'default'"
        warnings.append(f"tokenizer.ggml.pre is {state} for a gpt2 BPE vocab: llama.cpp falls back to its default "
                        "pre-tokenizer and splits text unlike the model's own tokenizer")
    return warnings


__all__ = ["GGUFReport", "RopeInfo", "TensorTypeStat", "TokenRef", "TokenizerInfo", "inspect_gguf"]
