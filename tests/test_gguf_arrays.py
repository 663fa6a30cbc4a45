"""Large metadata arrays written in bulk (convert/gguf_out.py `PackedArray`, `BulkArrayWriter`) are byte for byte what
gguf's GGUFWriter writes item by item: whole conversions, a Llama 3-sized vocabulary, and the edge cases of each item
type, compared against GGUFWriter itself; and the comparison is shown to see a one-byte difference."""
from __future__ import annotations

import dataclasses
import json
import random
import struct
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import pytest

import lcrun.convert.vocab as vocab_module
from lcrun.convert.convert import convert_checkpoint
from lcrun.convert.errors import TokenizerError
from lcrun.convert.gguf_out import BulkArrayWriter, PackedArray
from lcrun.convert.vocab import Vocab, add_vocab_to_gguf, load_vocab
from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.gguf_llama import add_llama_hparams
from tests.fixtures.tokenizer_factory import write_llama3_tokenizer

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}
ARRAY = gguf.GGUFValueType.ARRAY


def _item_by_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on add_vocab_to_gguf hands GGUFWriter plain lists, as it did before the bulk path existed."""
    monkeypatch.setattr(vocab_module, "PackedArray", lambda values: values)


def _write_vocab_gguf(path: Path, vocab: Vocab, writer_class: type[gguf.GGUFWriter]) -> bytes:
    w = writer_class(path, "llama")
    add_llama_hparams(w, n_ctx=256, n_embd=64, n_layer=1, n_ff=128, n_head=2, n_head_kv=2, head_dim=32,
                      n_vocab=len(vocab.tokens), rope_base=500000.0)
    add_vocab_to_gguf(w, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"sizes {len(a)} and {len(b)}, first difference at byte {at}"


# ---- whole conversions ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    make_llama_checkpoint(path, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, rope=LLAMA3, shards=2)
    return path


@pytest.mark.parametrize("outtype,split", [("bf16", 0), ("q8_0", 0), ("f16", 100_000)])
def test_conversion_is_byte_identical_to_gguf_writers_own_packing(ckpt: Path, tmp_path: Path, outtype: str,
                                                                  split: int, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bulk").mkdir()
    (tmp_path / "plain").mkdir()
    bulk = convert_checkpoint(ckpt, tmp_path / "bulk" / "m.gguf", outtype=outtype, split_max_size=split)
    _item_by_item(monkeypatch)
    plain = convert_checkpoint(ckpt, tmp_path / "plain" / "m.gguf", outtype=outtype, split_max_size=split)
    assert len(bulk.paths) == len(plain.paths) == (4 if split else 1)
    for ours, theirs in zip(bulk.paths, plain.paths):
        a, b = ours.read_bytes(), theirs.read_bytes()
        assert a == b, _first_difference(a, b)
    n_vocab = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    tokens = gguf.GGUFReader(bulk.paths[0]).fields[gguf.Keys.Tokenizer.LIST].contents()
    assert tokens == load_vocab(ckpt, n_vocab).tokens


def test_the_conversion_takes_the_bulk_path(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were BulkArrayWriter's hook never called (gguf renaming `_pack_val`, say), the bytes would still be right and
    the speed gone; count GGUFWriter's own per-value calls to see that it is not packing the vocabulary."""
    calls = 0
    own = gguf.GGUFWriter._pack_val

    def counting(self: gguf.GGUFWriter, *args: Any, **kwargs: Any) -> bytes:
        nonlocal calls
        calls += 1
        return own(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "_pack_val", counting)
    result = convert_checkpoint(ckpt, tmp_path / "m.gguf", outtype="bf16")
    n_tokens = len(gguf.GGUFReader(result.paths[0]).fields[gguf.Keys.Tokenizer.LIST].data)
    bulk_calls = calls
    calls = 0
    _item_by_item(monkeypatch)
    convert_checkpoint(ckpt, tmp_path / "plain.gguf", outtype="bf16")
    assert bulk_calls < 200 < n_tokens < calls, (bulk_calls, n_tokens, calls)


# ---- a vocabulary the size of Llama 3's -----------------------------------------------------------------------------

def _llama3_sized_tokenizer(model_dir: Path, n_bpe: int = 128000, n_merges: int = 280147) -> int:
    """The tiny Llama 3-style tokenizer grown to Llama 3's size: random tokens over the byte-level alphabet and a few
    other scripts (2-4 byte UTF-8), "a b" merges of existing tokens, the special tokens after them. (No NUL: llama.cpp
    reads token texts as C strings; the item-type tests below cover it.)"""
    small = write_llama3_tokenizer(model_dir)
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    rng = random.Random(3)
    alphabet = sorted({c for t in vocab for c in t}) + list("éß日本語한🙂🚀\u200b")
    while len(vocab) < n_bpe:
        vocab.setdefault("".join(rng.choices(alphabet, k=rng.randint(2, 12))), len(vocab))
    texts = list(vocab)
    data["model"]["merges"] = [f"{rng.choice(texts)} {rng.choice(texts)}" for _ in range(n_merges)]
    specials = data["added_tokens"]
    for i, entry in enumerate(specials):
        entry["id"] = n_bpe + i
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(e["id"]): {"content": e["content"], "special": True} for e in specials}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert small < n_bpe
    return n_bpe + len(specials)


@pytest.mark.slow
def test_llama3_sized_vocabulary_is_byte_identical_and_loads_in_llama_cpp(tmp_path: Path) -> None:
    n_vocab = _llama3_sized_tokenizer(tmp_path / "tok") + 256  # padded like an embedding of 128256 rows
    vocab = load_vocab(tmp_path / "tok", n_vocab)
    assert len(vocab.tokens) == n_vocab and len(vocab.merges) == 280147
    bulk = _write_vocab_gguf(tmp_path / "bulk.gguf", vocab, BulkArrayWriter)
    plain = _write_vocab_gguf(tmp_path / "plain.gguf", vocab, gguf.GGUFWriter)
    assert bulk == plain, _first_difference(bulk, plain)

    reader = gguf.GGUFReader(tmp_path / "bulk.gguf")
    keys = gguf.Keys.Tokenizer
    assert reader.fields[keys.LIST].contents() == vocab.tokens
    assert reader.fields[keys.MERGES].contents() == vocab.merges
    assert reader.fields[keys.TOKEN_TYPE].contents() == vocab.token_types
    llm = llama_cpp.Llama(model_path=str(tmp_path / "bulk.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.n_vocab() == n_vocab
        assert llm.token_bos() == vocab.bos_id
        assert llm.tokenize(b"<|eot_id|>", add_bos=False, special=True) == [vocab.eot_id]
    finally:
        llm.close()


def test_the_byte_comparison_sees_a_one_byte_difference(tmp_path: Path) -> None:
    """Negative control for the comparisons above: one token one letter off gives files that differ in one byte."""
    n = write_llama3_tokenizer(tmp_path / "tok")
    vocab = load_vocab(tmp_path / "tok", n)
    i = next(i for i, t in enumerate(vocab.tokens) if t.endswith("e"))
    changed = dataclasses.replace(vocab, tokens=[*vocab.tokens[:i], vocab.tokens[i][:-1] + "f", *vocab.tokens[i + 1:]])
    a = _write_vocab_gguf(tmp_path / "a.gguf", vocab, BulkArrayWriter)
    b = _write_vocab_gguf(tmp_path / "b.gguf", changed, gguf.GGUFWriter)
    assert len(a) == len(b) and a != b
    assert sum(x != y for x, y in zip(a, b)) == 1


# ---- each item type against GGUFWriter's own packing -----------------------------------------------------------------

_ARRAYS = {
    "strings": ["", "a", "Ġthe", "\u0000", "é", "日本語", "🙂🚀", "a b", "\U0010ffff", "x" * 70000, "\n\r\t"],
    "one string": [""],
    "ints": [0, 1, -1, 2**31 - 1, -2**31, 3, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED],
    "floats": [0.0, -0.0, 1.5, -2.25, 1e-45, 3.4028234663852886e38, float("inf"), float("-inf"), 0.1],
    "bools": [True, False, True],
}


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
@pytest.mark.parametrize("name", list(_ARRAYS))
def test_each_item_type_packs_as_gguf_writer_packs_it(name: str, endianess: gguf.GGUFEndian) -> None:
    values = _ARRAYS[name]
    bulk = BulkArrayWriter(None, "llama", endianess=endianess)
    plain = gguf.GGUFWriter(None, "llama", endianess=endianess)
    assert PackedArray(values).to_bytes(endianess) is not None  # the bulk path, not the fallback
    for add_vtype in (True, False):
        ours = bulk._pack_val(PackedArray(values), ARRAY, add_vtype=add_vtype)
        assert ours == plain._pack_val(values, ARRAY, add_vtype=add_vtype)


def test_nan_packs_as_gguf_writer_packs_it() -> None:
    values = [float("nan"), 1.0]
    assert BulkArrayWriter(None, "llama")._pack_val(PackedArray(values), ARRAY, add_vtype=True) == \
        gguf.GGUFWriter(None, "llama")._pack_val(values, ARRAY, add_vtype=True)


@pytest.mark.parametrize("values", [
    [1, "a"],             # mixed: GGUFWriter refuses
    [True, 1],            # bool then int: GGUFWriter refuses
    [2**31],              # out of int32: struct refuses
    [2**70],              # out of int64 too
    [1e39],               # a finite float too large for float32: struct refuses
    [b"raw", b"bytes"],   # bytes items: GGUFWriter writes them as they are
    [object()],           # no GGUF type at all
])
def test_what_the_bulk_path_does_not_handle_goes_to_gguf_writer(values: list[Any]) -> None:
    """Same bytes, or the same error GGUFWriter raises: the bulk path never writes what GGUFWriter would refuse."""
    assert PackedArray(values).to_bytes(gguf.GGUFEndian.LITTLE) is None
    outcomes = []
    for writer, value in ((gguf.GGUFWriter(None, "llama"), values),
                          (BulkArrayWriter(None, "llama"), PackedArray(values))):
        try:
            outcomes.append(writer._pack_val(value, ARRAY, add_vtype=True))
        except (ValueError, struct.error, OverflowError) as exc:
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]


# ---- the token table built in bulk still names bad input -------------------------------------------------------------

@pytest.fixture
def tok(tmp_path: Path) -> tuple[Path, int]:
    n = write_llama3_tokenizer(tmp_path / "tok")
    return tmp_path / "tok", n


def _edit_vocab(model_dir: Path, edit: Any) -> Path:
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data["model"])
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad,shown", [(-1, "-1"), (True, "True"), ("7", "'7'"), (1.0, "1.0"), (None, "None")])
def test_a_bad_token_id_is_named(tok: tuple[Path, int], bad: Any, shown: str) -> None:
    model_dir, n = tok
    path = _edit_vocab(model_dir, lambda m: m["vocab"].update({"Ġzzz": bad}))
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n)
    assert str(err.value) == f"{path}: token 'Ġzzz' has id {shown}, not a non-negative integer"


def test_two_tokens_sharing_an_id_are_named_in_file_order(tok: tuple[Path, int]) -> None:
    model_dir, n = tok

    def edit(model: dict[str, Any]) -> None:
        first = next(iter(model["vocab"]))
        model["vocab"].update({"Ġzq1": 40, "Ġzq2": 40, "Ġzq3": model["vocab"][first]})

    path = _edit_vocab(model_dir, edit)
    data = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    holder = next(t for t, i in data.items() if i == 40)
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n)
    assert str(err.value) == f"{path}: tokens {holder!r} and 'Ġzq1' share id 40"


def test_an_id_too_large_for_any_vocabulary(tok: tuple[Path, int]) -> None:
    model_dir, n = tok
    path = _edit_vocab(model_dir, lambda m: m["vocab"].update({"Ġhuge": 2**64}))
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n)
    assert str(err.value) == f"{path}: has {2**64 + 1} tokens but config.json's vocab_size is {n}"


def test_a_lone_surrogate_is_named_not_a_traceback_at_write_time(tok: tuple[Path, int]) -> None:
    model_dir, n = tok
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["vocab"]["Ġbad\ud800"] = n  # the next free id: the special tokens follow the BPE vocabulary
    path.write_text(json.dumps(data), encoding="utf-8")  # ensure_ascii spells the surrogate as \ud800
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n + 1)
    assert str(err.value) == f"{path}: token 'Ġbad\\ud800' is not valid Unicode (a lone surrogate); GGUF stores UTF-8"


@pytest.mark.parametrize("merge,problem", [
    ("a  b", "is not two tokens separated by one space"),
    (" ab", "is not two tokens separated by one space"),
    ("ab", "is not two tokens separated by one space"),
    (["a b", "c"], "has a token with a space"),
    (["a", "b", "c"], "is neither \"a b\" nor a pair of tokens"),
    (["", "b"], "is neither \"a b\" nor a pair of tokens"),
    (["a", 1], "is neither \"a b\" nor a pair of tokens"),
    (7, "is neither \"a b\" nor a pair of tokens"),
])
@pytest.mark.parametrize("form", ["strings", "pairs"])
def test_a_bad_merge_is_named(tok: tuple[Path, int], merge: Any, problem: str, form: str) -> None:
    model_dir, n = tok

    def edit(model: dict[str, Any]) -> None:
        merges = model["merges"] if form == "pairs" else [" ".join(m) for m in model["merges"]]
        model["merges"] = [*merges[:5], merge, *merges[5:]]

    path = _edit_vocab(model_dir, edit)
    with pytest.raises(TokenizerError) as err:
        load_vocab(model_dir, n)
    assert str(err.value).startswith(f"{path}: merge {merge!r} ")
    assert problem in str(err.value)


def test_merges_mixing_both_forms_are_read(tok: tuple[Path, int]) -> None:
    model_dir, n = tok
    pairs = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    _edit_vocab(model_dir, lambda m: m.update(merges=[" ".join(p) if i % 2 else p for i, p in enumerate(pairs)]))
    assert load_vocab(model_dir, n).merges == [" ".join(p) for p in pairs]


def test_an_added_token_listed_twice_keeps_its_last_entry(tok: tuple[Path, int], tmp_path: Path) -> None:
    model_dir, n = tok
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"].append({"id": n, "content": "<a>", "special": True})
    data["added_tokens"].append({"id": n, "content": "<b>", "special": False})
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    vocab = load_vocab(model_dir, n + 2)
    assert vocab.tokens[n:] == ["<b>", f"[PAD{n + 1}]"]
    assert vocab.token_types[n:] == [gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED]


def test_a_text_held_by_two_ids_resolves_to_the_lower(tok: tuple[Path, int]) -> None:
    """An added token may repeat a vocabulary entry's text at another id; lookups by text take the first id."""
    model_dir, n = tok
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    bos = data["added_tokens"][0]
    data["added_tokens"].append({**bos, "id": n})
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    vocab = load_vocab(model_dir, n + 1)
    assert vocab.tokens[n] == vocab.tokens[bos["id"]] == bos["content"]
    assert vocab.bos_id == bos["id"]
