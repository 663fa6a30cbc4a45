"""Build the conversion benchmark's checkpoint: a small Llama 3.1-shaped model with the full 128256-token vocabulary.

    .venv/bin/python benchmarks/make_bench_checkpoint.py OUTDIR [--seed N]

Small layers, real-size vocabulary: the embedding and the untied lm_head are each 128256 x 1024, so the tokenizer
and the two largest tensors cost what they cost in a real Llama 3 conversion while the whole run stays in seconds.
Weights are random BF16 written straight into two safetensors shards (no torch); the tokenizer is a consistent
byte-level BPE synthesised here (256 byte symbols, then merges of existing tokens up to 128000) with Llama 3's exact
pre-tokenizer, plus Llama 3.1's 256 special tokens. Needs numpy and ml_dtypes (both in the project venv).
"""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

HIDDEN = 1024
LAYERS = 8
HEADS = 16
KV_HEADS = 8
HEAD_DIM = HIDDEN // HEADS
FFN = 3584
BPE_TOKENS = 128000
SPECIAL_TOKENS = 256
VOCAB = BPE_TOKENS + SPECIAL_TOKENS
CHUNK_ELEMENTS = 1 << 22  # random numbers are made and written 4 Mi values at a time

LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS_TEXT, EOM, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"
EOS_IDS = [128001, 128008, 128009]

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


# --- tokenizer -------------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (space -> 'Ġ', newline -> 'Ċ')."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def llama3_special_tokens() -> list[str]:
    named = {128000: BOS, 128001: EOS_TEXT, 128004: "<|finetune_right_pad_id|>", 128006: "<|start_header_id|>",
             128007: "<|end_header_id|>", 128008: EOM, 128009: EOT, 128010: "<|python_tag|>"}
    names, reserved = [], 0
    for tid in range(BPE_TOKENS, VOCAB):
        if tid in named:
            names.append(named[tid])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def synthesise_bpe(rng: random.Random) -> tuple[list[str], list[tuple[str, str]]]:
    """128000 tokens: the 256 byte symbols, then merges that each join two existing tokens into a new one.

    The merges imitate what a trained Llama 3 vocabulary holds (the pre-tokenizer decides which tokens are reachable):
    all 1-3 digit numbers, runs of spaces and newlines, punctuation clusters, and mostly words — letter strings, with
    or without the leading 'Ġ' — built from short pieces so that every prefix chain stays in the vocabulary."""
    byte_char = bytes_to_unicode()
    tokens = [byte_char[b] for b in sorted(byte_char, key=lambda b: ord(byte_char[b]))]
    known = set(tokens)
    merges: list[tuple[str, str]] = []

    def add(left: str, right: str) -> bool:
        joined = left + right
        if joined in known or left not in known or right not in known:
            return False
        known.add(joined)
        tokens.append(joined)
        merges.append((left, right))
        return True

    space, newline, tab = byte_char[ord(" ")], byte_char[ord("\n")], byte_char[ord("\t")]
    for n in range(2, 17):
        add(space * (n - 1), space)
    for n in range(2, 5):
        add(newline * (n - 1), newline)
        add(tab * (n - 1), tab)
    digits = "0123456789"
    for a in digits:
        for b in digits:
            add(a, b)
    for a in digits:
        for b in digits:
            for c in digits:
                add(a + b, c)
    punct = [c for c in ".,;:!?()[]{}'\"-_=+*/\\<>|&%$#@`~^"]
    for p in punct:
        add(space, p)
        add(p, newline)
        for q in rng.sample(punct, 6):
            add(p, q)

    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
               1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    lowercase = list(letters)
    # word pieces (no space) and word starts ('Ġ' + letters), kept in creation order so short pieces come first
    pieces: list[str] = [c for c in lowercase] + [c.upper() for c in lowercase]
    starts: list[str] = []
    for c in pieces[:]:
        add(space, c)
        starts.append(space + c)

    def short_biased(pool: list[str]) -> str:
        return pool[int(len(pool) * rng.random() ** 3)]

    while len(tokens) < BPE_TOKENS:
        roll = rng.random()
        if roll < 0.45:
            left = short_biased(starts)
        elif roll < 0.9:
            left = short_biased(pieces)
        else:
            left = rng.choices(lowercase, weights)[0]
        right = short_biased(pieces) if rng.random() < 0.6 else rng.choices(lowercase, weights)[0]
        if len(left) + len(right) > 14 or not add(left, right):
            continue
        (starts if left.startswith(space) else pieces).append(left + right)
    return tokens, merges


def tokenizer_json(tokens: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict:
    added = [{"id": BPE_TOKENS + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, name in enumerate(specials)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {BOS: {"id": BOS, "ids": [BPE_TOKENS], "tokens": [BOS]}},
                },
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [f"{a} {b}" for a, b in merges],  # Llama 3.1's own files use the "a b" form
        },
    }


def tokenizer_config(specials: list[str]) -> dict:
    return {
        "added_tokens_decoder": {
            str(BPE_TOKENS + i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
            for i, name in enumerate(specials)
        },
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --- weights ---------------------------------------------------------------------------------------------------

def model_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BPE_TOKENS,
        "eos_token_id": EOS_IDS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def layer_tensors(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "mlp.down_proj.weight", (HIDDEN, FFN)),
        (p + "mlp.gate_proj.weight", (FFN, HIDDEN)),
        (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
        (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
        (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
    ]


def shards() -> list[list[tuple[str, tuple[int, ...]]]]:
    half = LAYERS // 2
    first = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(half):
        first += layer_tensors(i)
    second = []
    for i in range(half, LAYERS):
        second += layer_tensors(i)
    second += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return [first, second]


def bf16_chunks(rng: np.random.Generator, name: str, count: int) -> Iterator[bytes]:
    """Random values as BF16 bytes: norms near 1 (as trained RMSNorm weights are), everything else N(0, 0.02)."""
    is_norm = name.endswith("norm.weight")
    for start in range(0, count, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, count - start)
        values = rng.standard_normal(n, dtype=np.float32)
        values *= np.float32(0.02)
        if is_norm:
            values += np.float32(1.0)
        yield values.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes()


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> int:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the safetensors writer does
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            for chunk in bf16_chunks(rng, name, int(np.prod(shape))):
                f.write(chunk)
    return offset


def build(out: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tokens, merges = synthesise_bpe(random.Random(seed))
    specials = llama3_special_tokens()
    assert len(tokens) == BPE_TOKENS and specials[EOS_IDS[-1] - BPE_TOKENS] == EOT
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, merges, specials), ensure_ascii=False),
                                        encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(specials), indent=2), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(model_config(), indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BPE_TOKENS, "do_sample": True, "eos_token_id": EOS_IDS, "temperature": 0.6, "top_p": 0.9,
         "transformers_version": "4.43.0"}, indent=2), encoding="utf-8")

    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    total = 0
    layout = shards()
    for k, tensors in enumerate(layout, start=1):
        fname = f"model-{k:05d}-of-{len(layout):05d}.safetensors"
        total += write_safetensors(out / fname, tensors, rng)
        weight_map.update({name: fname for name, _ in tensors})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2),
        encoding="utf-8")

    try:  # the tokenizer must load where a user's would; tokenizers is in the project's test extra
        from tokenizers import Tokenizer
    except ImportError:
        print("note: tokenizers not installed; tokenizer.json not load-checked", file=sys.stderr)
    else:
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
        assert tok.token_to_id(EOT) == EOS_IDS[-1]
        tok.encode("Hello world, 1234 tokens!\n\n  ok")

    print(f"{out}: {total / 2**20:.0f} MiB of BF16 weights in {len(layout)} shards, vocab {VOCAB} "
          f"({len(merges)} merges), {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.outdir, args.seed)


if __name__ == "__main__":
    main()
