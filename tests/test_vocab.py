"""The tokenizer we write into GGUF tokenizes exactly as the Hugging Face tokenizer does, in llama.cpp itself.

A tiny byte-level BPE configured like Llama 3's (tests/fixtures/tokenizer_factory.py) is converted to a vocab-only
GGUF, loaded by llama.cpp through llama-cpp-python, and both tokenizers are run on the same texts."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import pytest
from tokenizers import Tokenizer

from lcrun.convert.errors import TokenizerError
from lcrun.convert.gguf_out import BulkArrayWriter
from lcrun.convert.vocab import LLAMA3_REGEX, QWEN2_REGEX, Vocab, add_vocab_to_gguf, load_vocab
from tests.fixtures.tokenizer_factory import LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS, write_llama3_tokenizer
from tests.fixtures.gguf_llama import add_llama_hparams

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you doing today?",
    "Café naïve façade résumé Größe São Paulo Ærø Łódź",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Emoji 🙂🚀🔥, a family 👨‍👩‍👧 and a flag 🇫🇷!",
    "1234567 and 12 and 123 and 1234 and 3.14159 and -42 and 1,000,000",
    "def f(x):\n    if x:\n        return [i * 2 for i in range(x)]\n\treturn None\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "   leading spaces and trailing spaces   ",
    "many\n\n\nnewlines\r\nand\rcarriage returns\n \n  \n",
    "tabs\t\tand  double  spaces\t \t mixed",
    "I'm sure they'LL say we've done what we'd planned; you're right, he's there, it'S DONE.",
    "Don't, can't, won't, shan't, 'quoted', ''double''",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>"
    "assistant<|end_header_id|>\n\n",
    "text<|eom_id|>more<|python_tag|>print(1)<|reserved_special_token_5|>",
    "<|not_a_special_token|> and <|eot_id and |eot_id|>",
    "Prices: $3.50, €12,99, ¥1000; URL https://example.com/a?b=c&d=e#f",
    "ALL CAPS SHOUTING and camelCaseIdentifiers and snake_case_names",
    "\u00a0non-breaking\u2003em space\u200bzero width\u3000ideographic space",
    "",
    " ",
    "\n",
    "a",
]

# pieces whose boundaries the pre-tokenizers treat differently; random strings of them catch what a fixed list misses
_FUZZ_PIECES = [
    " ", "  ", "\t", "\n", "\n\n", "\r\n", "'", "'s", "'LL", "'Ve", "a", "Z", "word", " Word", "ß", "é", "日本",
    "한", "🙂", "👍🏽", "0", "12", "3456", "!", "?!", "...", "(", ")", "{", "_", "-", "$", "<|eot_id|>",
    "<|start_header_id|>", "<|", "|>", "\u00a0", "\u3000", "٣", "Ⅻ",
]


def _fuzz(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_FUZZ_PIECES) for _ in range(rng.randint(1, 12))) for _ in range(n)]


TEXTS = CORPUS + _fuzz(300, seed=1)


def _write_vocab_gguf(path: Path, vocab: Vocab) -> Path:
    """A GGUF with only metadata: the llama hyper-parameters llama.cpp reads before its vocabulary, and the vocab,
    its arrays packed in bulk as the converter packs them (tests/test_gguf_arrays.py: the same bytes GGUFWriter
    writes item by item)."""
    w = BulkArrayWriter(path, "llama")
    add_llama_hparams(w, n_ctx=256, n_embd=64, n_layer=1, n_ff=128, n_head=2, n_head_kv=2, head_dim=32,
                      n_vocab=len(vocab.tokens), rope_base=500000.0)
    add_vocab_to_gguf(w, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@contextlib.contextmanager
def _llama_vocab(path: Path) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def _engine_ids(llm: llama_cpp.Llama, texts: list[str]) -> list[list[int]]:
    return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]


def _hf_ids(hf: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [hf.encode(t, add_special_tokens=False).ids for t in texts]


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def _edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    model_dir = tmp_path_factory.mktemp("llama3_tok")
    n = write_llama3_tokenizer(model_dir)
    return model_dir, n


@pytest.fixture
def tok_dir(llama3_dir: tuple[Path, int], tmp_path: Path) -> tuple[Path, int]:
    """A private copy of the Llama-3-style tokenizer, for tests that edit its files."""
    src, n = llama3_dir
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst, n


# ---- parity with llama.cpp ---------------------------------------------------------------------------------------

_PRE_TOKENIZER_VARIANTS = {
    # name written to GGUF: (tokenizer.json pre_tokenizer, normalizer, ignore_merges) as those tokenizers ship them
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}, None, True),
    "qwen2": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        {"type": "NFC"}, False),
    "gpt-2": ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, None, False),
}


@pytest.mark.parametrize("pre", list(_PRE_TOKENIZER_VARIANTS))
def test_llama_cpp_tokenizes_like_hugging_face(tok_dir: tuple[Path, int], tmp_path: Path, pre: str) -> None:
    model_dir, n = tok_dir
    pre_tokenizer, normalizer, ignore_merges = _PRE_TOKENIZER_VARIANTS[pre]

    def edit(data: dict[str, Any]) -> None:
        data["pre_tokenizer"] = pre_tokenizer
        data["normalizer"] = normalizer
        data["model"]["ignore_merges"] = ignore_merges

    _edit_json(model_dir / "tokenizer.json", edit)
    vocab = load_vocab(model_dir, n)
    assert vocab.pre == pre
    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    with _llama_vocab(_write_vocab_gguf(tmp_path / "vocab.gguf", vocab)) as llm:
        assert llm.n_vocab() == n
        engine = _engine_ids(llm, TEXTS)
        expected = _hf_ids(hf, TEXTS)
        mismatches = [(t, e, x) for t, e, x in zip(TEXTS, engine, expected) if e != x]
        assert not mismatches, f"{len(mismatches)} texts tokenize differently, first: {mismatches[0]}"
        for text, ids in zip(TEXTS, expected):
            assert llm.detokenize(ids, special=True) == hf.decode(ids, skip_special_tokens=False).encode("utf-8")
            assert llm.detokenize(ids, special=True).decode("utf-8") == text


def test_parity_is_not_vacuous_a_wrong_pre_tokenizer_name_changes_tokens(llama3_dir: tuple[Path, int],
                                                                        tmp_path: Path) -> None:
    model_dir, n = llama3_dir
    vocab = load_vocab(model_dir, n)
    expected = _hf_ids(Tokenizer.from_file(str(model_dir / "tokenizer.json")), CORPUS)
    for wrong in ("gpt-2", "qwen2"):
        path = _write_vocab_gguf(tmp_path / f"{wrong}.gguf", dataclasses.replace(vocab, pre=wrong))
        with _llama_vocab(path) as llm:
            differing = [t for t, e, x in zip(CORPUS, _engine_ids(llm, CORPUS), expected) if e != x]
        assert differing, f"pre={wrong!r} tokenizes the corpus like llama-bpe; the corpus cannot tell them apart"


def test_special_tokens_are_single_ids_and_bos_is_added_by_llama_cpp(llama3_dir: tuple[Path, int],
                                                                     tmp_path: Path) -> None:
    model_dir, n = llama3_dir
    vocab = load_vocab(model_dir, n)
    with _llama_vocab(_write_vocab_gguf(tmp_path / "vocab.gguf", vocab)) as llm:
        for i, text in enumerate(LLAMA3_SPECIAL_TOKENS):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == [n - len(LLAMA3_SPECIAL_TOKENS) + i]
        # with special=False a special token's text is just text
        assert len(llm.tokenize(b"<|eot_id|>", add_bos=False, special=False)) > 1
        assert llm.tokenize(b"hi", add_bos=True, special=True)[0] == vocab.bos_id == llm.token_bos()
        assert llm.token_eos() == vocab.eos_id


def test_padded_vocab_loads_in_llama_cpp_and_tokenizes_the_same(llama3_dir: tuple[Path, int],
                                                               tmp_path: Path) -> None:
    model_dir, n = llama3_dir
    vocab = load_vocab(model_dir, n + 8)
    assert vocab.tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 8)]
    assert vocab.token_types[n:] == [gguf.TokenType.UNUSED] * 8
    expected = _hf_ids(Tokenizer.from_file(str(model_dir / "tokenizer.json")), CORPUS)
    with _llama_vocab(_write_vocab_gguf(tmp_path / "vocab.gguf", vocab)) as llm:
        assert llm.n_vocab() == n + 8
        assert _engine_ids(llm, CORPUS) == expected


# ---- metadata read back with gguf's reader -------------------------------------------------------------------------

def test_metadata_reads_back(llama3_dir: tuple[Path, int], tmp_path: Path) -> None:
    model_dir, n = llama3_dir
    vocab = load_vocab(model_dir, n)
    reader = gguf.GGUFReader(_write_vocab_gguf(tmp_path / "vocab.gguf", vocab))
    keys = gguf.Keys.Tokenizer
    hf_vocab = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    first_special = n - len(LLAMA3_SPECIAL_TOKENS)
    assert len(hf_vocab) == first_special  # the special tokens come after the BPE vocabulary, as in Llama 3

    assert _field(reader, keys.MODEL) == "gpt2"
    assert _field(reader, keys.PRE) == "llama-bpe"
    tokens = _field(reader, keys.LIST)
    types = _field(reader, keys.TOKEN_TYPE)
    assert len(tokens) == len(types) == n
    assert all(tokens[i] == text for text, i in hf_vocab.items())
    assert tokens[first_special:] == LLAMA3_SPECIAL_TOKENS
    assert types[:first_special] == [gguf.TokenType.NORMAL] * first_special
    assert types[first_special:] == [gguf.TokenType.CONTROL] * len(LLAMA3_SPECIAL_TOKENS)

    ids = {t: first_special + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    assert _field(reader, keys.BOS_ID) == ids["<|begin_of_text|>"]
    assert _field(reader, keys.EOS_ID) == ids["<|eot_id|>"]
    assert _field(reader, keys.EOT_ID) == ids["<|eot_id|>"]
    assert _field(reader, keys.EOM_ID) == ids["<|eom_id|>"]
    assert keys.PAD_ID not in reader.fields
    assert _field(reader, keys.ADD_BOS) is True
    assert _field(reader, keys.ADD_EOS) is False
    assert _field(reader, keys.CHAT_TEMPLATE) == LLAMA3_CHAT_TEMPLATE
    assert keys.CHAT_TEMPLATES not in reader.fields


def test_merges_as_pairs_and_as_strings_give_the_same_gguf_merges(tok_dir: tuple[Path, int],
                                                                  tmp_path: Path) -> None:
    model_dir, n = tok_dir
    path = model_dir / "tokenizer.json"
    pairs = json.loads(path.read_text(encoding="utf-8"))["model"]["merges"]
    assert isinstance(pairs[0], list) and len(pairs) > 100  # tokenizers writes the newer pair form
    from_pairs = load_vocab(model_dir, n).merges

    def as_strings(data: dict[str, Any]) -> None:
        data["model"]["merges"] = [f"{a} {b}" for a, b in data["model"]["merges"]]

    _edit_json(path, as_strings)
    from_strings = load_vocab(model_dir, n)
    assert from_pairs == from_strings.merges == [f"{a} {b}" for a, b in pairs]
    reader = gguf.GGUFReader(_write_vocab_gguf(tmp_path / "vocab.gguf", from_strings))
    assert _field(reader, gguf.Keys.Tokenizer.MERGES) == from_pairs


def test_add_bos_falls_back_to_the_post_processor(tok_dir: tuple[Path, int]) -> None:
    model_dir, n = tok_dir
    _edit_json(model_dir / "tokenizer_config.json", lambda c: c.pop("add_bos_token"))
    assert load_vocab(model_dir, n).add_bos is True  # Llama 3's TemplateProcessing prepends <|begin_of_text|>

    _edit_json(model_dir / "tokenizer.json", lambda d: d.update(post_processor=None))
    assert load_vocab(model_dir, n).add_bos is False


def test_special_tokens_given_as_dicts_or_only_in_config_json(tok_dir: tuple[Path, int]) -> None:
    model_dir, n = tok_dir
    first_special = n - len(LLAMA3_SPECIAL_TOKENS)

    def as_dicts(c: dict[str, Any]) -> None:
        c["bos_token"] = {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False}
        c["eos_token"] = {"content": "<|end_of_text|>", "lstrip": False, "normalized": False}
        c["pad_token"] = "<|finetune_right_pad_id|>"

    _edit_json(model_dir / "tokenizer_config.json", as_dicts)
    vocab = load_vocab(model_dir, n)
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (first_special, first_special + 1, first_special + 4)

    _edit_json(model_dir / "tokenizer_config.json", lambda c: [c.pop(k) for k in ("bos_token", "eos_token")])
    (model_dir / "config.json").write_text(json.dumps({"bos_token_id": first_special,
                                                       "eos_token_id": [first_special + 9, first_special + 8]}))
    vocab = load_vocab(model_dir, n)
    assert (vocab.bos_id, vocab.eos_id) == (first_special, first_special + 9)


def test_named_chat_templates_and_chat_template_jinja(tok_dir: tuple[Path, int], tmp_path: Path) -> None:
    model_dir, n = tok_dir
    templates = [{"name": "default", "template": "{{ main }}"}, {"name": "tool_use", "template": "{{ tools }}"},
                 {"name": "rag", "template": "{{ documents }}"}]
    _edit_json(model_dir / "tokenizer_config.json", lambda c: c.update(chat_template=templates))
    vocab = load_vocab(model_dir, n)
    assert vocab.chat_template == "{{ main }}"
    assert vocab.chat_templates == {"tool_use": "{{ tools }}", "rag": "{{ documents }}"}
    reader = gguf.GGUFReader(_write_vocab_gguf(tmp_path / "vocab.gguf", vocab))
    keys = gguf.Keys.Tokenizer
    assert _field(reader, keys.CHAT_TEMPLATE) == "{{ main }}"
    assert _field(reader, keys.CHAT_TEMPLATE_N.format(name="tool_use")) == "{{ tools }}"
    assert _field(reader, keys.CHAT_TEMPLATES) == ["rag", "tool_use"]

    _edit_json(model_dir / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    assert load_vocab(model_dir, n).chat_template is None
    (model_dir / "chat_template.jinja").write_text("{{ from_file }}\n", encoding="utf-8")
    assert load_vocab(model_dir, n).chat_template == "{{ from_file }}\n"


def test_non_special_added_tokens_are_user_defined(tok_dir: tuple[Path, int], tmp_path: Path) -> None:
    model_dir, n = tok_dir
    entry = {"id": n, "content": "<tool>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False}
    _edit_json(model_dir / "tokenizer.json", lambda d: d["added_tokens"].append(entry))
    vocab = load_vocab(model_dir, n + 1)
    assert vocab.tokens[n] == "<tool>"
    assert vocab.token_types[n] == gguf.TokenType.USER_DEFINED
    with _llama_vocab(_write_vocab_gguf(tmp_path / "vocab.gguf", vocab)) as llm:
        # llama.cpp splits user-defined tokens out of plain text, as the Hugging Face tokenizer does
        assert llm.tokenize(b"x<tool>y", add_bos=False, special=False)[1] == n
        assert llm.detokenize([n], special=False) == b"<tool>"


# ---- bad input --------------------------------------------------------------------------------------------------

def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as err:
        load_vocab(tmp_path, 100)
    assert str(err.value).startswith(f"{tmp_path}: ")
    assert "no tokenizer.json" in str(err.value)

    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(TokenizerError) as err:
        load_vocab(tmp_path, 100)
    assert str(err.value).startswith(f"{tmp_path}: ")
    assert "SentencePiece tokenizers are not supported yet" in str(err.value)


def test_malformed_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", ', encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        load_vocab(tmp_path, 100)
    assert str(err.value).startswith(f"{tmp_path / 'tokenizer.json'}: not valid JSON")
    assert "\n" not in str(err.value)


def test_malformed_tokenizer_config_json(tok_dir: tuple[Path, int]) -> None:
    model_dir, n = tok_dir
    (model_dir / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n)
    assert str(err.value).startswith(f"{model_dir / 'tokenizer_config.json'}: not valid JSON")


@pytest.mark.parametrize("regex", [
    LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}{1,4}"),  # one character off Llama 3's
    r"\s+",
])
def test_unknown_pre_tokenizer_regex_is_refused(tok_dir: tuple[Path, int], regex: str) -> None:
    model_dir, n = tok_dir
    _edit_json(model_dir / "tokenizer.json",
               lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=regex))
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n)
    message = str(err.value)
    assert message.startswith(f"{model_dir / 'tokenizer.json'}: ")
    assert "pre-tokenizer regex is not one llama.cpp implements" in message


def test_byte_level_regex_after_a_split_is_refused(tok_dir: tuple[Path, int]) -> None:
    model_dir, n = tok_dir
    _edit_json(model_dir / "tokenizer.json", lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(use_regex=True))
    with pytest.raises(TokenizerError, match="pre-tokenizer regex is not one llama.cpp implements") as err:
        load_vocab(model_dir, n)
    assert str(err.value).startswith(f"{model_dir / 'tokenizer.json'}: ")


def test_tokenizer_larger_than_vocab_size(llama3_dir: tuple[Path, int]) -> None:
    model_dir, n = llama3_dir
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n - 1)
    assert str(err.value) == f"{model_dir / 'tokenizer.json'}: has {n} tokens but config.json's vocab_size is {n - 1}"


def test_bos_token_missing_from_vocabulary(tok_dir: tuple[Path, int]) -> None:
    model_dir, n = tok_dir
    _edit_json(model_dir / "tokenizer_config.json", lambda c: c.update(bos_token="<s>"))
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n)
    assert str(err.value) == f"{model_dir / 'tokenizer_config.json'}: bos_token '<s>' is not in the vocabulary"
