"""A model's tokenizer alone: llama.cpp loads the GGUF with `vocab_only` (no tensors, no context), so counting a
document's tokens is exact — the same tokenizer code the engine runs — and costs the vocabulary's load, not the
weights'. llama_cpp is imported when a vocabulary is opened, so importing this module stays cheap."""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lcrun.errors import EngineError

from .runtime import _log, _start_llama


class Vocabulary:
    """The tokenizer of one GGUF file (a whole model, or a vocabulary-only file lcrun wrote)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        lc = self._lc = llama_cpp
        self._model: Any = None
        _start_llama(lc)
        path = Path(path)
        if not path.is_file():
            raise EngineError(str(path), "no such model file")
        params = lc.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        _log.errors.clear()
        self._model = lc.llama_model_load_from_file(os.fsencode(path), params)
        if not self._model:
            raise EngineError(str(path), f"llama.cpp could not load the vocabulary ({_log.detail('no reason given')})")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self._vocab)
        self.add_bos: bool = bool(lc.llama_vocab_get_add_bos(self._vocab))

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """llama_tokenize, as the engine calls it. `special` False: control-token text in a document stays text."""
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

    def count(self, text: str, *, special: bool = False) -> int:
        return len(self.tokenize(text, special=special))

    def count_all(self, texts: Iterable[str], *, special: bool = False) -> list[int]:
        return [self.count(text, special=special) for text in texts]

    def close(self) -> None:
        if self._model is not None:
            self._lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Vocabulary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
