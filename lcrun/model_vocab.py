"""A model's tokenizer without its weights, for counting a document's tokens exactly as llama.cpp will.

llama.cpp tokenizes from a GGUF's `tokenizer.ggml.*` keys alone (a `vocab_only` load reads no tensor). So every
source comes down to a GGUF with those keys: a local GGUF as it is; a Hub GGUF's header (the prefix `estimate`
already reads by range requests) written back as a vocabulary-only file; a safetensors checkpoint's tokenizer.json
(local, or fetched alone from the Hub) through the converter's own vocabulary code — the keys `lcrun convert` would
write — so the count is the one the converted model will give."""
from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LcrunError

if TYPE_CHECKING:
    from lcrun.convert.gguf_out import BulkArrayWriter
    from lcrun.convert.vocab import Vocab

    from .engine.vocab import VocabularyFile
    from .gguf_reader import GGUFHeader
    from .model_spec import ModelSpec

_TOKENIZER_PREFIX = "tokenizer."


def _writer(path: Path, n_ctx_train: int) -> BulkArrayWriter:
    """A GGUF of architecture llama with the hyper-parameters llama.cpp reads before the vocabulary (any values
    do: a vocab_only load stops after the vocabulary). The tokenizer does not depend on the architecture."""
    from lcrun.convert.gguf_out import BulkArrayWriter

    writer = BulkArrayWriter(path, "llama")
    writer.add_context_length(max(1, n_ctx_train))
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(32)
    return writer


def _finish(writer: BulkArrayWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_vocab_from_tokenizer(path: Path, vocab: Vocab, n_ctx_train: int) -> Path:
    from lcrun.convert.vocab import add_vocab_to_gguf

    writer = _writer(path, n_ctx_train)
    add_vocab_to_gguf(writer, vocab)
    _finish(writer)
    return path


def write_vocab_from_header(path: Path, header: GGUFHeader) -> Path:
    """The header's tokenizer keys, each with the GGUF type llama.cpp reads it as: arrays as they were in the file
    (their raw bytes), ids and counts u32, flags bool, strings string."""
    import gguf

    from lcrun.convert.gguf_out import PackedArray

    from .gguf_values import GGUFArray

    class RawArray(PackedArray):
        def __init__(self, array: GGUFArray) -> None:
            super().__init__([])
            self.array = array

        def __len__(self) -> int:
            return self.array.length

        def to_bytes(self, endianess: gguf.GGUFEndian) -> bytes:
            return struct.pack("<IQ", self.array.element_type, self.array.length) + self.array.raw

    if header.byte_order != "<":
        raise LcrunError(header.source, "a big-endian GGUF: its vocabulary cannot be read here")
    keys = {k: v for k, v in header.fields.items() if k.startswith(_TOKENIZER_PREFIX)}
    if "tokenizer.ggml.tokens" not in keys:
        raise LcrunError(header.source, "the GGUF header has no tokenizer (tokenizer.ggml.tokens)")
    arch = header.architecture or "llama"
    n_ctx = header.get(f"{arch}.context_length")
    writer = _writer(path, n_ctx if isinstance(n_ctx, int) else 4096)
    for key, value in keys.items():
        if isinstance(value, GGUFArray):
            writer.add_array(key, RawArray(value))
        elif isinstance(value, list):
            writer.add_array(key, value)  # a short array: gguf types it from its items, as when it was written
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    _finish(writer)
    return path


def _tokenizer_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    from lcrun.convert.vocab import load_vocab

    return load_vocab(model_dir, vocab_size)


@contextmanager
def open_vocabulary(model: str, *, spec: ModelSpec | None = None, revision: str | None = None,
                    hub_file: str | None = None) -> Iterator[VocabularyFile]:
    """The tokenizer of MODEL as lcrun names models (a GGUF, a checkpoint folder, `demo`, a profile, a Hub repo id,
    `org/repo:QUANT`), loaded by llama.cpp. `spec`: the model as `resolve_model` already read it (a Hub GGUF's
    header is then not fetched twice). Nothing of the weights is read or downloaded."""
    from .engine.vocab import VocabularyFile

    path = Path(model).expanduser()
    if path.is_file():
        with VocabularyFile(path) as vocabulary:
            yield vocabulary
        return
    if spec is None:
        from .model_spec import resolve_model

        spec = resolve_model(model, revision=revision, gguf_file=hub_file)
    with tempfile.TemporaryDirectory(prefix="lcrun-vocab-") as tmp:
        target = Path(tmp) / "vocab.gguf"
        if spec.vocab_header is not None:
            write_vocab_from_header(target, spec.vocab_header)
        else:
            if path.is_dir() or model == "demo":
                from lcrun.models import demo_checkpoint

                folder = path if path.is_dir() else demo_checkpoint()
            elif spec.source in ("hub", "profile"):
                from .hub_tokenizer import download_tokenizer_files

                # a profile's name is its repo id; a Hub spec read from config.json is named by its repo id
                folder = download_tokenizer_files(spec.name, revision)
            else:
                raise LcrunError(model, f"lcrun cannot find the tokenizer of a {spec.source} model")
            write_vocab_from_tokenizer(target, _tokenizer_vocab(folder, spec.n_vocab), spec.n_ctx_train)
        with VocabularyFile(target) as vocabulary:
            yield vocabulary


__all__ = ["open_vocabulary", "write_vocab_from_header", "write_vocab_from_tokenizer"]
