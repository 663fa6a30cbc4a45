"""What a GGUF file (or a split set) says about itself, and what in it will quietly hurt long-context use.

Read with gguf's own `GGUFReader`, memory-mapped: only the header is parsed and the one small tensor we look into
(`rope_freqs.weight`) is read. Anything malformed becomes a one-line `GGUFFileError` naming the file.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys, LlamaFileType, size_label

from .errors import GGUFFileError

GGUF_MAGIC_BYTES = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"
# gguf-split and GGUFWriter(split_max_*) name the files `<prefix>-00001-of-00003.gguf`
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

LLAMA3_FREQ_BASE = 500000.0
LLAMA3_ORIGINAL_CONTEXT = 8192
LLAMA3_NAME = re.compile(r"llama[\s_-]*3\.[123]\b", re.IGNORECASE)
END_OF_TEXT = "<|end_of_text|>"
EOT_ID = "<|eot_id|>"

# Arrays we never decode (hundreds of thousands of entries, nothing to report); other long arrays are only counted.
_SKIPPED_ARRAYS = {Keys.Tokenizer.MERGES, Keys.Tokenizer.SCORES, Keys.Tokenizer.TOKEN_TYPE}
_MAX_DECODED_ARRAY = 4096


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["paths"] = [str(p) for p in self.paths]
        return data


@dataclass
class _TensorEntry:
    name: str
    type_name: str
    n_elements: int
    n_bytes: int


@dataclass
class _SplitFile:
    """One file's header, copied out of the reader so no memory map outlives `inspect_gguf`."""
    path: Path
    size: int
    version: int
    fields: dict[str, Any]
    tensors: list[_TensorEntry]
    rope_freqs: np.ndarray | None


class _ShortRead(Exception):
    def __init__(self, offset: int, needed: int, in_tensor_data: bool) -> None:
        super().__init__(offset, needed)
        self.offset, self.needed, self.in_tensor_data = offset, needed, in_tensor_data


class _ImpossibleArray(Exception):
    def __init__(self, offset: int, length: int) -> None:
        super().__init__(offset, length)
        self.offset, self.length = offset, length


_VALUE_TYPES = {t.value for t in GGUFValueType}


class _StrictReader(GGUFReader):
    # GGUFReader slices its memory map without bounds checks: a truncated file yields short arrays that surface
    # later as an unrelated error (or spin on empty reads). Refusing every short read keeps the error precise.
    # `_get` is gguf-py's (private) single read primitive; if a future gguf drops it, this override goes unused
    # and `_read_split`'s own extent checks still apply.
    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        needed = int(offset) + np.dtype(dtype).itemsize * int(count)
        if needed > len(self.data):
            raise _ShortRead(int(offset), needed, in_tensor_data=hasattr(self, "data_offset"))
        return super()._get(offset, dtype, count, override_order)

    # An array's claimed length is trusted and walked one element at a time: a flipped bit in it would grind
    # through the whole file (minutes on a 5 GB model). Every element takes at least a few bytes, so a length the
    # rest of the file cannot hold is corrupt, and we say so at once.
    def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
        if raw_type == GGUFValueType.ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            length = int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(GGUFValueType(item_type)) if item_type in _VALUE_TYPES else None
            min_item = np.dtype(scalar).itemsize if scalar is not None else 8  # strings and arrays: a u64 length
            if length * min_item > len(self.data) - (orig_offs + 12):
                raise _ImpossibleArray(orig_offs, length)
        return super()._get_field_parts(orig_offs, raw_type)


def _check_is_gguf_file(path: Path) -> int:
    try:
        if not path.exists():
            raise GGUFFileError(path, "no such file")
        if path.is_dir():
            raise GGUFFileError(path, "is a directory, not a GGUF file")
        if not path.is_file():
            raise GGUFFileError(path, "not a regular file")
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise GGUFFileError(path, f"cannot read: {err.strerror or err}") from err
    if size == 0:
        raise GGUFFileError(path, "empty file (0 bytes)")
    if magic != GGUF_MAGIC_BYTES[: len(magic)]:
        raise GGUFFileError(path, f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC_BYTES!r})")
    if len(magic) < len(GGUF_MAGIC_BYTES):
        raise GGUFFileError(path, f"truncated: {size} bytes is too short for a GGUF header")
    return size


@dataclass(frozen=True)
class _ArrayLength:
    """Stands in for an array we only count."""
    length: int


def _field_value(reader: GGUFReader, key: str) -> Any:
    f = reader.fields[key]
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        n = len(f.data)
        if key in _SKIPPED_ARRAYS or (key != Keys.Tokenizer.LIST and n > _MAX_DECODED_ARRAY):
            return _ArrayLength(n)
    return f.contents()


def _read_split(path: Path) -> _SplitFile:
    size = _check_is_gguf_file(path)
    try:
        reader = _StrictReader(path)
        fields = {key: _field_value(reader, key) for key in reader.fields if not key.startswith("GGUF.")}
        version = int(reader.fields["GGUF.version"].contents())
        tensors = []
        rope_freqs = None
        for t in reader.tensors:
            end = t.data_offset + t.n_bytes
            if end > size:
                raise GGUFFileError(path, f"truncated: tensor {t.name!r} ends at byte {end} but the file has {size}")
            tensors.append(_TensorEntry(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)))
            if t.name == ROPE_FREQS and t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                rope_freqs = np.array(t.data, dtype=np.float32).reshape(-1)  # a copy: a few hundred bytes
    except GGUFFileError:
        raise
    except _ShortRead as err:
        where = "tensor data" if err.in_tensor_data else "header"
        raise GGUFFileError(path, f"truncated: {where} needs {err.needed} bytes but the file has {size}") from None
    except _ImpossibleArray as err:
        raise GGUFFileError(path, f"truncated or corrupt header: an array at byte {err.offset} claims {err.length} "
                                  f"entries, more than the {size}-byte file can hold") from None
    except Exception as err:  # noqa: BLE001 — gguf's reader raises ValueError/KeyError/IndexError/… on bad input
        detail = str(err) or type(err).__name__
        raise GGUFFileError(path, f"corrupt or unsupported GGUF ({detail})") from err
    return _SplitFile(path, size, version, fields, tensors, rope_freqs)


def _split_set(path: Path, given: _SplitFile) -> tuple[list[Path], int, list[str]]:
    """(paths of the declared split set, declared count, warnings) for the file the user named."""
    count = given.fields.get(Keys.Split.LLM_KV_SPLIT_COUNT)
    if not isinstance(count, int) or count <= 1:
        return [path], 1, []
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path], count, [f"split set incomplete: this file is one of {count} splits, but its name does not "
                               "follow <name>-00001-of-000NN.gguf, so the others cannot be found"]
    prefix = match["prefix"]
    return [path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)], count, []


def inspect_gguf(path: Path) -> GGUFReport:
    path = Path(path)
    given = _read_split(path)
    expected, split_count, warnings = _split_set(path, given)

    splits: list[_SplitFile] = []
    missing: list[Path] = []
    for p in expected:
        if p == path:
            splits.append(given)
        elif p.exists():
            splits.append(_read_split(p))
        else:
            missing.append(p)
    if missing:
        names = ", ".join(p.name for p in missing)
        warnings.append(f"split set incomplete: found {len(splits)} of {split_count} files, missing {names}")

    # llama.cpp reads metadata from the first split; the others carry only the split.* keys
    meta = splits[0].fields if splits[0].path == expected[0] else given.fields

    tensors = [t for s in splits for t in s.tensors]
    declared_tensors = meta.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if split_count > 1 and not missing and isinstance(declared_tensors, int) and declared_tensors != len(tensors):
        warnings.append(f"split set incomplete: split.tensors.count says {declared_tensors} tensors, "
                        f"the {split_count} files hold {len(tensors)}")

    rope_freqs = next((s.rope_freqs for s in splits if s.rope_freqs is not None), None)
    has_rope_freqs = any(t.name == ROPE_FREQS for t in tensors)
    report = _build_report(path, splits, split_count, meta, tensors, has_rope_freqs, rope_freqs)
    # without the first split there is no model metadata to judge, only the missing file to report
    report.warnings = warnings + (_model_warnings(report, meta) if splits[0].path == expected[0] else [])
    return report


def _int_or_none(value: Any) -> Any:
    return value if isinstance(value, (int, list)) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    return f"<array of {value.length}>" if isinstance(value, _ArrayLength) else value


def _file_type_name(value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _build_report(path: Path, splits: list[_SplitFile], split_count: int, meta: dict[str, Any],
                  tensors: list[_TensorEntry], has_rope_freqs: bool, rope_freqs: np.ndarray | None) -> GGUFReport:
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

    tokens = meta.get(Keys.Tokenizer.LIST)
    token_list = tokens if isinstance(tokens, list) else None

    def token(key: str) -> TokenRef | None:
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        text = token_list[value] if token_list is not None and 0 <= value < len(token_list) else None
        return TokenRef(value, text)

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
        paths=[s.path for s in splits],
        split_count=split_count,
        file_size=sum(s.size for s in splits),
        gguf_version=splits[0].version,
        architecture=arch,
        name=_str_or_none(meta.get(Keys.General.NAME)),
        parameter_count=n_params,
        size_label=_str_or_none(meta.get(Keys.General.SIZE_LABEL)) or (size_label(n_params, n_params, 0, 0)
                                                                      if n_params else None),
        file_type=_file_type_name(meta.get(Keys.General.FILE_TYPE)),
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
        lcrun={k: _plain(v) for k, v in meta.items() if k.startswith("lcrun.")},
        warnings=[],
    )


def _model_warnings(report: GGUFReport, meta: dict[str, Any]) -> list[str]:
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
        tokens = meta.get(Keys.Tokenizer.LIST)
        if isinstance(tokens, list) and EOT_ID in tokens:
            eot = tokens.index(EOT_ID)
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
