"""Hugging Face tokenizer files in, GGUF tokenizer metadata out: `load_vocab(...)`, then `add_vocab_to_gguf(...)`.

Only byte-level BPE from tokenizer.json (Llama 3 and its relatives) is read. llama.cpp does not run the tokenizer's
own pre-tokenizer: it looks up a hard-coded one by name (`tokenizer.ggml.pre`). The name is chosen here from the
regexes the tokenizer.json itself declares, and a regex llama.cpp does not implement is an error, never a guess.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from string import ascii_letters, digits
from typing import Any

import gguf
import numpy as np

from .errors import TokenizerError
from .gguf_out import PackedArray

# the pre-tokenizer regexes as tokenizer.json files spell them; llama.cpp's src/llama-vocab.cpp carries each as a
# comment ("original regex from tokenizer.json") above its own adaptation
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# what the ByteLevel pre-tokenizer applies when use_regex is true (tokenizers' byte_level.rs)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# the regexes a tokenizer applies, in order -> the llama.cpp pre-tokenizer that applies the same ones
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (LLAMA3_REGEX,): "llama-bpe",
    (QWEN2_REGEX,): "qwen2",
    (GPT2_REGEX,): "gpt-2",
}

# llama.cpp applies no normalizer to BPE text; NFC (Qwen2) only differs on input that is not already NFC
_HARMLESS_NORMALIZERS = (None, "NFC")


@dataclass
class Vocab:
    model: str                          # tokenizer.ggml.model: "gpt2" is llama.cpp's byte-level BPE
    pre: str                            # tokenizer.ggml.pre: llama.cpp's name for the pre-tokenizer
    tokens: list[str]
    token_types: list[int]              # gguf.TokenType values
    merges: list[str]                   # "a b", highest priority first
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # named templates besides the default


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(path, f"not valid JSON ({exc})") from exc
    except OSError as exc:
        raise TokenizerError(path, f"cannot read: {exc.strerror or exc}") from exc


def _read_object(path: Path, *, required: bool = False) -> dict[str, Any]:
    if not path.is_file() and not required:
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TokenizerError(path, "must hold a JSON object")
    return data


def _read_tokenizer_json(model_dir: Path) -> tuple[dict[str, Any], Path]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        if (model_dir / "tokenizer.model").is_file():
            raise TokenizerError(model_dir, "has only tokenizer.model, a SentencePiece tokenizer; SentencePiece "
                                            "tokenizers are not supported yet (a tokenizer.json is needed)")
        raise TokenizerError(model_dir, "no tokenizer.json: the checkpoint has no tokenizer to convert")
    return _read_object(path, required=True), path


def _regexes(pre_tokenizer: Any, path: Path) -> tuple[tuple[str, ...], bool]:
    """The regexes the pre-tokenizer splits with, in order, and whether it ends in the byte-level mapping."""
    if not isinstance(pre_tokenizer, dict):
        raise TokenizerError(path, "has no pre_tokenizer; llama.cpp's byte-level BPE needs one")
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if not isinstance(steps, list):
        raise TokenizerError(path, "pre_tokenizer Sequence has no 'pretokenizers' list")
    regexes: list[str] = []
    byte_level = False
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if byte_level:
            raise TokenizerError(path, f"pre_tokenizer has a {kind} step after ByteLevel, which llama.cpp does not do")
        if kind == "Split":
            pattern = step.get("pattern")
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if not isinstance(regex, str):
                raise TokenizerError(path, f"pre_tokenizer Split on {pattern!r} is not a regex llama.cpp implements")
            if step.get("behavior") != "Isolated" or step.get("invert", False):
                raise TokenizerError(path, f"pre_tokenizer Split with behavior {step.get('behavior')!r} and invert "
                                           f"{step.get('invert')!r} is not what llama.cpp does (Isolated, no invert)")
            regexes.append(regex)
        elif kind == "ByteLevel":
            if step.get("add_prefix_space", True):
                raise TokenizerError(path, "pre_tokenizer ByteLevel has add_prefix_space set, "
                                           "which llama.cpp's byte-level BPE does not do")
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
            byte_level = True
        else:
            raise TokenizerError(path, f"pre_tokenizer step {kind!r} is not one llama.cpp implements")
    return tuple(regexes), byte_level


def _pre_name(data: dict[str, Any], path: Path) -> str:
    regexes, byte_level = _regexes(data.get("pre_tokenizer"), path)
    if not byte_level:
        raise TokenizerError(path, "is not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer); "
                                   "only byte-level BPE tokenizers are supported")
    name = PRE_TOKENIZERS.get(regexes)
    if name is None:
        shown = " then ".join(repr(r) for r in regexes) or "none"
        raise TokenizerError(path, f"the pre-tokenizer regex is not one llama.cpp implements ({shown}); "
                                   f"tokenization in llama.cpp would differ from the model's")
    return name


def _merge(item: Any, path: Path) -> str:
    if isinstance(item, str):
        if item.count(" ") != 1 or item.startswith(" ") or item.endswith(" "):
            raise TokenizerError(path, f"merge {item!r} is not two tokens separated by one space")
        return item
    if isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) and p for p in item):
        if " " in item[0] or " " in item[1]:
            raise TokenizerError(path, f"merge {item!r} has a token with a space, which GGUF's \"a b\" merges "
                                       f"cannot express")
        return f"{item[0]} {item[1]}"
    raise TokenizerError(path, f"merge {item!r} is neither \"a b\" nor a pair of tokens")


def _merges(raw: list[Any], path: Path) -> list[str]:
    """The merges as "a b" strings. Checked in bulk: "a b" is well-formed exactly when it holds one space, neither
    first nor last, and a pair of non-empty tokens without spaces joins to such a string; only when that fails is
    each merge looked at, to name the first bad one."""
    kinds = set(map(type, raw))
    try:
        merges = raw if kinds <= {str} else list(map(" ".join, raw)) if kinds <= {list} else None
    except TypeError:  # a pair with something other than strings in it
        merges = None
    if merges is not None:
        spaces = np.fromiter(map(str.count, merges, repeat(" ")), dtype=np.int64, count=len(merges))
        if (spaces == 1).all() and not any(map(str.startswith, merges, repeat(" "))) \
                and not any(map(str.endswith, merges, repeat(" "))):
            return merges
    return [_merge(m, path) for m in raw]


def _first_unencodable(texts: list[str]) -> str | None:
    """The first text that has no UTF-8 form (a lone surrogate, which JSON's \\ud800 escapes can spell)."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        return next(t for t in texts if not _encodes(t))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _vocab_ids(vocab: dict[str, Any], path: Path, vocab_size: int) -> np.ndarray:
    """The ids of `vocab`'s entries, in its order, checked to be distinct non-negative integers."""
    try:
        ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab)) \
            if set(map(type, vocab.values())) <= {int} else None
    except OverflowError:
        ids = None
    if ids is None or (ids.size and ids.min() < 0):
        bad = next(((t, i) for t, i in vocab.items() if type(i) is not int or i < 0), None)
        if bad is not None:
            raise TokenizerError(path, f"token {bad[0]!r} has id {bad[1]!r}, not a non-negative integer")
        # what remains is an id too large for the array, and so for any vocab_size
        raise TokenizerError(path, f"has {max(vocab.values()) + 1} tokens but config.json's vocab_size is {vocab_size}")
    order = np.argsort(ids, kind="stable")
    ranked = ids[order]
    repeats = order[1:][ranked[1:] == ranked[:-1]]
    if repeats.size:
        # the first token that reuses an id, and the token that had it first (what a loop in file order reports)
        later = int(repeats.min())
        first = int(np.flatnonzero(ids == ids[later])[0])
        texts = list(vocab)
        raise TokenizerError(path, f"tokens {texts[first]!r} and {texts[later]!r} share id {ids[later]}")
    return ids


def _token_table(data: dict[str, Any], path: Path, vocab_size: int) -> tuple[list[str], np.ndarray]:
    model = data["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerError(path, "model has no 'vocab' object")
    ids = _vocab_ids(vocab, path, vocab_size)
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise TokenizerError(path, "'added_tokens' is not a list")
    entries: list[tuple[int, str, int]] = []
    for entry in added:
        tid = entry.get("id") if isinstance(entry, dict) else None
        text = entry.get("content") if isinstance(entry, dict) else None
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0 or not isinstance(text, str):
            raise TokenizerError(path, f"added token {entry!r} lacks an integer 'id' or a 'content' string")
        # llama.cpp matches both kinds in raw text; only special ones are hidden when detokenizing
        entries.append((tid, text, gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED))
    n_tokens = max([int(ids.max()) + 1 if ids.size else 0, *(tid + 1 for tid, _, _ in entries)])
    if n_tokens > vocab_size:
        raise TokenizerError(path, f"has {n_tokens} tokens but config.json's vocab_size is {vocab_size}")
    table = np.empty(vocab_size, dtype=object)
    types = np.full(vocab_size, gguf.TokenType.UNUSED, dtype=np.int32)
    table[ids] = list(vocab)
    types[ids] = gguf.TokenType.NORMAL
    for tid, text, ttype in entries:  # in file order: a token listed twice keeps its last entry
        table[tid] = text
        types[tid] = ttype
    # ids the tokenizer leaves unused (up to the embedding's row count) get placeholders, as llama.cpp's converter does
    unused = np.flatnonzero(types == gguf.TokenType.UNUSED)
    table[unused] = [f"[PAD{i}]" for i in unused.tolist()]
    tokens: list[str] = table.tolist()
    bad = _first_unencodable(tokens)
    if bad is not None:
        raise TokenizerError(path, f"token {bad!r} is not valid Unicode (a lone surrogate); GGUF stores UTF-8")
    return tokens, types


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_id(value: Any) -> int | None:
    if isinstance(value, list) and value:
        value = value[0]  # e.g. generation_config's eos_token_id: [eos, eom, eot]; the first is the main one
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _special_id(name: str, tokenizer_config: dict[str, Any], tokenizer_config_path: Path,
                fallbacks: list[tuple[dict[str, Any], Path]], token_ids: dict[str, int],
                vocab_size: int) -> int | None:
    text = _content(tokenizer_config.get(f"{name}_token"))
    if text is not None:
        if text not in token_ids:
            raise TokenizerError(tokenizer_config_path, f"{name}_token {text!r} is not in the vocabulary")
        return token_ids[text]
    for config, path in fallbacks:
        tid = _config_id(config.get(f"{name}_token_id"))
        if tid is not None:
            if not 0 <= tid < vocab_size:
                raise TokenizerError(path, f"{name}_token_id {tid} is outside the vocabulary (size {vocab_size})")
            return tid
    return None


def _template_adds(data: dict[str, Any], token_ids: dict[str, int], tid: int | None, *, first: bool) -> bool:
    """Whether tokenizer.json's TemplateProcessing puts token `tid` first (or last) around a single sequence."""
    post = data.get("post_processor")
    if not isinstance(post, dict) or tid is None:
        return False
    steps = post.get("processors") if post.get("type") == "Sequence" else [post]
    for step in steps if isinstance(steps, list) else []:
        if not isinstance(step, dict) or step.get("type") != "TemplateProcessing":
            continue
        single = step.get("single")
        if not isinstance(single, list) or not single:
            return False
        piece = single[0] if first else single[-1]
        special = piece.get("SpecialToken") if isinstance(piece, dict) else None
        if not isinstance(special, dict):
            return False
        name = special.get("id")
        entry = (step.get("special_tokens") or {}).get(name)
        ids = entry.get("ids") if isinstance(entry, dict) else [token_ids.get(name)]
        return ids == [tid]
    return False


def _add_flag(tokenizer_config: dict[str, Any], key: str, path: Path, default: bool) -> bool:
    value = tokenizer_config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerError(path, f"'{key}' must be true or false, got {value!r}")
    return value


def _chat_templates(model_dir: Path, tokenizer_config: dict[str, Any],
                    path: Path) -> tuple[str | None, dict[str, str]]:
    value = tokenizer_config.get("chat_template")
    main: str | None = None
    named: dict[str, str] = {}
    if isinstance(value, str):
        main = value
    elif isinstance(value, list):
        for choice in value:
            name = choice.get("name") if isinstance(choice, dict) else None
            template = choice.get("template") if isinstance(choice, dict) else None
            if not isinstance(name, str) or not isinstance(template, str):
                raise TokenizerError(path, "chat_template list entries need a 'name' and a 'template' string")
            if name == "default":
                main = template
            else:
                named[name] = template
    elif value is not None:
        raise TokenizerError(path, f"chat_template must be a string or a list, got {type(value).__name__}")
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        # transformers saves the template in its own file since 4.49 and prefers it when loading
        try:
            main = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(jinja, f"cannot read as UTF-8 text ({exc})") from exc
    return main, named


def load_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """Read the tokenizer in `model_dir`; `vocab_size` is config.json's (the embedding's row count)."""
    model_dir = Path(model_dir)
    data, path = _read_tokenizer_json(model_dir)
    model = data.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(path, "has no 'model' object")
    if model.get("type") != "BPE":
        raise TokenizerError(path, f"model type {model.get('type')!r} is not supported; only byte-level BPE is")
    if model.get("byte_fallback"):
        raise TokenizerError(path, "is a SentencePiece-style BPE (byte_fallback); only byte-level BPE is supported")
    normalizer = data.get("normalizer")
    normalizer_type = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    if normalizer_type not in _HARMLESS_NORMALIZERS:
        raise TokenizerError(path, f"normalizer {normalizer_type!r} is not one llama.cpp applies")
    pre = _pre_name(data, path)
    merges_raw = model.get("merges")
    if not isinstance(merges_raw, list):
        raise TokenizerError(path, "model has no 'merges' list")
    merges = _merges(merges_raw, path)
    bad = _first_unencodable(merges)
    if bad is not None:
        raise TokenizerError(path, f"merge {bad!r} is not valid Unicode (a lone surrogate); GGUF stores UTF-8")
    tokens, token_types = _token_table(data, path, vocab_size)
    # text -> id of the tokens in use; where two ids share a text the lower wins (built in reverse, the last write
    # of each key is its lowest id)
    used = np.flatnonzero(token_types != gguf.TokenType.UNUSED)[::-1].tolist()
    token_ids = dict(zip(map(tokens.__getitem__, used), used))

    tc_path = model_dir / "tokenizer_config.json"
    tokenizer_config = _read_object(tc_path)
    fallbacks = [(_read_object(model_dir / name), model_dir / name)
                 for name in ("config.json", "generation_config.json")]
    special = {name: _special_id(name, tokenizer_config, tc_path, fallbacks, token_ids, vocab_size)
               for name in ("bos", "eos", "pad")}
    add_bos = _add_flag(tokenizer_config, "add_bos_token", tc_path,
                        _template_adds(data, token_ids, special["bos"], first=True))
    add_eos = _add_flag(tokenizer_config, "add_eos_token", tc_path,
                        _template_adds(data, token_ids, special["eos"], first=False))
    if add_bos and special["bos"] is None:
        raise TokenizerError(tc_path, "add_bos_token is true but no bos_token is given")
    if add_eos and special["eos"] is None:
        raise TokenizerError(tc_path, "add_eos_token is true but no eos_token is given")
    chat_template, chat_templates = _chat_templates(model_dir, tokenizer_config, tc_path)
    return Vocab(
        model="gpt2", pre=pre, tokens=tokens, token_types=token_types.tolist(), merges=merges,
        bos_id=special["bos"], eos_id=special["eos"],
        eot_id=token_ids.get("<|eot_id|>"), eom_id=token_ids.get("<|eom_id|>"), pad_id=special["pad"],
        add_bos=add_bos, add_eos=add_eos, chat_template=chat_template, chat_templates=chat_templates,
    )


def _template_name(name: str) -> str:
    # the same restriction gguf's add_chat_template applies to template names
    return "".join(c if c in ascii_letters + digits else "_" for c in name)


def add_vocab_to_gguf(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Any GGUFWriter writes the same bytes; a `BulkArrayWriter` writes the large arrays in bulk."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(PackedArray(vocab.tokens))
    writer.add_token_types(PackedArray(vocab.token_types))
    writer.add_token_merges(PackedArray(vocab.merges))
    for tid, add in ((vocab.bos_id, writer.add_bos_token_id), (vocab.eos_id, writer.add_eos_token_id),
                     (vocab.eot_id, writer.add_eot_token_id), (vocab.eom_id, writer.add_eom_token_id),
                     (vocab.pad_id, writer.add_pad_token_id)):
        if tid is not None:
            add(tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
    if vocab.chat_templates:
        # written here rather than through add_chat_template's list form, which orders the names by a set: the
        # same checkpoint must give the same bytes
        names = {_template_name(n): t for n, t in sorted(vocab.chat_templates.items())}
        for name, template in names.items():
            writer.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), template)
        writer.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, list(names))
