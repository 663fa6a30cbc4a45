"""A model's vocabulary (llama.cpp's tokenizer, token pieces, special and end-of-generation tokens) and its GGUF
metadata as llama.cpp reads it: `Vocabulary` is the engine's part, over a loaded model; `VocabularyFile` loads a
GGUF's vocabulary alone (llama.cpp's `vocab_only`: no tensors, no context), so counting a document's tokens runs the
same tokenizer code as the engine and costs the vocabulary's load, not the weights'. llama_cpp is imported when a
vocabulary file is opened, so importing this module stays cheap."""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcrun.errors import EngineError

from .library import log, start_llama


class Vocabulary:
    """The vocabulary of a model llama.cpp loaded (`model`: its llama_model handle, owned by the caller)."""

    def __init__(self, lc: Any, model: Any) -> None:
        self._lc = lc
        self._vocab = lc.llama_model_get_vocab(model)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}     # token → its bytes: a token's piece never changes
        self._eog: dict[int, bool] = {}

    @property
    def add_bos(self) -> bool:
        """Whether prompts start with BOS (llama.cpp adds it when tokenizing with add_special)."""
        return bool(self._lc.llama_vocab_get_add_bos(self._vocab))

    def special_tokens(self) -> dict[str, int]:
        """bos, eos and eot ids the vocabulary defines (absent ones left out)."""
        lc, vocab = self._lc, self._vocab
        found = {"bos": lc.llama_vocab_bos(vocab), "eos": lc.llama_vocab_eos(vocab), "eot": lc.llama_vocab_eot(vocab)}
        return {name: int(tok) for name, tok in found.items() if tok >= 0}

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._lc.llama_vocab_is_eog(self._vocab, token))
        return eog

    def token_text(self, token: int) -> str:
        return self._lc.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        # Chat templates spell out <|begin_of_text|> themselves, hence no BOS by default.
        lc, data = self._lc, text.encode("utf-8")
        size = len(data) + 2
        for _ in range(2):
            buf = np.empty(size, dtype=np.int32)
            n = lc.llama_tokenize(self._vocab, data, len(data), buf.ctypes.data_as(ctypes.POINTER(lc.llama_token)),
                                  size, add_bos, special)
            if n >= 0:
                return buf[:n].tolist()
            size = -n
        raise EngineError("text", f"llama.cpp could not tokenize {len(data):,} bytes")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = token_piece(self._lc, self._vocab, token, special=False)
        return piece



def token_piece(lc: Any, vocab: Any, token: int, *, special: bool) -> bytes:
    """A token's bytes from llama.cpp (control tokens spelled out when `special`). llama-cpp-python's own
    token_to_piece uses a fixed 32-byte buffer; long pieces need more, which llama.cpp says by a negative size."""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_token_to_piece(vocab, lc.llama_token(int(token)), buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


class VocabularyFile(Vocabulary):
    """The tokenizer of one GGUF file (a whole model, or a vocabulary-only file lcrun wrote), loaded alone. It owns
    its model handle: close it, or use it as a context manager."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self._model: Any = None
        start_llama(llama_cpp)
        path = Path(path)
        if not path.is_file():
            raise EngineError(str(path), "no such model file")
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        log.errors.clear()
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not model:
            raise EngineError(str(path), f"llama.cpp could not load the vocabulary ({log.detail('no reason given')})")
        self._model = model
        super().__init__(llama_cpp, model)

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """The engine's tokenizer; `special` False by default: control-token text in a document stays text."""
        return super().tokenize(text, special=special, add_bos=add_bos)

    def count(self, text: str, *, special: bool = False) -> int:
        return len(self.tokenize(text, special=special))

    def count_all(self, texts: Iterable[str], *, special: bool = False) -> list[int]:
        return [self.count(text, special=special) for text in texts]

    def close(self) -> None:
        if self._model is not None:
            self._lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> VocabularyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _meta_string(fn: Any, model: Any, index: int, buf: list[Any]) -> str:
    n = fn(model, index, buf[0], len(buf[0]))
    if n >= len(buf[0]):  # the return is the full length, like snprintf
        buf[0] = ctypes.create_string_buffer(n + 1)
        n = fn(model, index, buf[0], len(buf[0]))
    return buf[0].raw[: max(n, 0)].decode("utf-8", errors="replace")


def model_metadata(lc: Any, model: Any) -> dict[str, str]:
    """Every GGUF key/value llama.cpp read (arrays left out), as strings."""
    buf = [ctypes.create_string_buffer(1024)]
    return {
        _meta_string(lc.llama_model_meta_key_by_index, model, i, buf):
            _meta_string(lc.llama_model_meta_val_str_by_index, model, i, buf)
        for i in range(lc.llama_model_meta_count(model))
    }
