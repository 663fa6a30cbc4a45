"""llama.cpp's grammar sampler (`llama_sampler_init_grammar`) for one sequence, used as llama.cpp's own
common_sampler uses it: the next token is sampled with the sequence's chain alone and then checked against the
grammar (one candidate: microseconds); only a token the grammar rejects is sampled again with the grammar applied
first. Checking a whole 128K-token vocabulary costs about 14 ms on this machine (docs/performance.md), so that
resample first asks the grammar which first bytes may come next — one token per byte value — and checks only the
tokens that start with one of them, the end-of-generation tokens too: a token whose first character the grammar
refuses is refused whatever follows, so the result is the grammar-first sample, exactly.

llama.cpp's grammar reads pieces as C strings and takes the bytes after a multi-byte character's lead byte as its
continuation unchecked, so a NUL inside a piece, or a control character after a lead byte, would slip past it: such
tokens are refused here (the reply stays valid UTF-8, and JSON stays JSON). Every token is checked before the grammar
accepts it: llama.cpp throws a C++ exception on a token its grammar cannot
take, which through ctypes ends the process. That is also why lazy grammars are triggered here rather than by
`llama_sampler_init_grammar_lazy_patterns`, which replays the text around a pattern's match into the grammar
unchecked: a trigger is a token (one of `Grammar.trigger_tokens`) or, at the start of a reply, a token whose text
begins one of `Grammar.trigger_prefixes`, and from that token on every token goes through the check above.

`schema_gbnf` is llama-cpp-python's maintained JSON-schema converter (`llama_grammar.json_schema_to_gbnf`); which
schemas it honours is decided by lcrun.generation.json_schema before it is called."""
from __future__ import annotations

import codecs
import ctypes
import os
import re
import sys
import tempfile
import threading
from typing import Any

import numpy as np

from lcrun.errors import GrammarError

from .library import log
from .protocol import Grammar
from .vocab import token_piece

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])   # llama_token_data
_PARSE_ERROR = re.compile(r"error parsing grammar: (.*)")
_stderr_lock = threading.Lock()


# llama-cpp-python 0.3.36's converter lets a JSON string hold raw control characters, which JSON forbids (RFC 8259
# section 7; Python's json.loads refuses them): its `char` rule is replaced by llama.cpp's current one
_CONVERTER_CHAR = r'char ::= [^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


def schema_gbnf(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema, by llama-cpp-python's converter (a port of llama.cpp's json_schema_to_grammar.py),
    its strings held to JSON's characters."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return "\n".join(_JSON_CHAR if line == _CONVERTER_CHAR else line
                     for line in json_schema_to_gbnf(json.dumps(schema)).split("\n"))


def init_grammar(lc: Any, vocab: Any, grammar: Grammar) -> Any:
    """A llama_sampler for `grammar` (the caller frees it); GrammarError with llama.cpp's reason when it does not
    compile. llama.cpp prints parse errors to stderr itself: the descriptor is borrowed for the call (under a lock;
    what another thread writes meanwhile is lost, a window of microseconds)."""
    log.errors.clear()
    with _stderr_lock, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            sampler = lc.llama_sampler_init_grammar(vocab, grammar.gbnf.encode("utf-8"), grammar.root.encode("utf-8"))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        printed = captured.read(1 << 16).decode("utf-8", errors="replace")
    if not sampler:
        found = _PARSE_ERROR.search(printed)
        reason = found.group(1).strip() if found else log.detail("llama.cpp gave no reason")
        log.errors.clear()
        raise GrammarError("grammar", f"llama.cpp cannot compile it: {reason}")
    return sampler


class VocabularyIndex:
    """What the grammar check needs of the vocabulary, built once per engine on first use (about 0.2 s for 128K
    tokens): each token's piece as the grammar sees it (control tokens spelled out), its first byte, the tokens that
    start with each byte, one single-byte token per byte value to ask the grammar with, and the end-of-generation
    tokens."""

    def __init__(self, lc: Any, vocab: Any, n_vocab: int) -> None:
        self._lc, self._vocab, self.n_vocab = lc, vocab, n_vocab
        self._pieces: dict[int, bytes] = {}
        self._built = False
        self._lock = threading.Lock()   # built by a request's thread (serve checks its grammar there) or the engine's
        self.by_first_byte: list[np.ndarray] = []
        self.whole_utf8 = np.zeros(0, dtype=bool)          # the piece is valid UTF-8 from a character boundary
        self.continues: dict[int, np.ndarray] = {}         # k: the piece is valid after a character missing k bytes
        self.probes = np.zeros(0, dtype=np.int32)          # a token per byte value that has a one-byte token
        self.probe_bytes = np.zeros(0, dtype=np.int32)
        self.unprobed = np.zeros(0, dtype=np.int32)         # tokens starting with a byte that has no probe
        self.eog = np.zeros(0, dtype=np.int32)

    def piece(self, token: int) -> bytes:
        """The token's bytes with control tokens spelled out (what llama.cpp's grammar matches against)."""
        found = self._pieces.get(token)
        if found is None:
            found = self._pieces[token] = token_piece(self._lc, self._vocab, token, special=True)
        return found

    def build(self) -> None:
        with self._lock:
            if not self._built:
                self._build()

    def _build(self) -> None:
        lc, vocab = self._lc, self._vocab
        first = np.full(self.n_vocab, -1, dtype=np.int32)
        whole = np.zeros(self.n_vocab, dtype=bool)
        single: dict[int, int] = {}
        eog = []
        for token in range(self.n_vocab):
            piece = self.piece(token)
            if lc.llama_vocab_is_eog(vocab, token):
                eog.append(token)
            elif piece and 0 not in piece:  # a NUL inside hides the rest from the grammar: never a candidate
                first[token] = piece[0]
                whole[token] = utf8_continues(b"", piece)
                if len(piece) == 1:
                    single.setdefault(piece[0], token)
        self._pieces.clear()  # a lazy trigger needs a few pieces again; 128K of them need not stay
        order = np.argsort(first, kind="stable")
        bounds = np.searchsorted(first[order], np.arange(257) - 0.5)
        self.by_first_byte = [order[bounds[b]:bounds[b + 1]].astype(np.int32) for b in range(256)]
        self.probe_bytes = np.array(sorted(single), dtype=np.int32)
        self.probes = np.array([single[b] for b in sorted(single)], dtype=np.int32)
        for k, lead in ((1, b"\xc2"), (2, b"\xe1"), (3, b"\xf1")):  # leads that take any continuation byte
            ok = np.zeros(self.n_vocab, dtype=bool)
            for token in np.concatenate(self.by_first_byte[0x80:0xC0]).tolist():
                ok[token] = utf8_continues(lead, self.piece(token))
            self.continues[k] = ok
        no_probe = [self.by_first_byte[b] for b in range(256) if b not in single]
        self.unprobed = np.concatenate(no_probe) if no_probe else np.zeros(0, dtype=np.int32)
        self.eog = np.array(eog, dtype=np.int32)
        self.whole_utf8 = whole
        self._built = True


def utf8_continues(pending: bytes, piece: bytes) -> bool:
    """Whether `pending` (an unfinished character) followed by `piece` is valid UTF-8 so far."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    decoder.setstate((pending, 0))
    try:
        decoder.decode(piece)
    except UnicodeDecodeError:
        return False
    return True


def utf8_pending(pending: bytes, piece: bytes) -> bytes:
    """The unfinished character left after `pending` + `piece` (valid UTF-8 so far)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    decoder.setstate((pending, 0))
    decoder.decode(piece)
    return decoder.getstate()[0]


class GrammarSampler:
    """One sequence's grammar beside its sampler chain: `sample` draws the next token that the grammar allows and
    advances both. Single-threaded, as the engine is."""

    def __init__(self, lc: Any, ctx: Any, vocab: Any, index: VocabularyIndex, grammar: Grammar,
                 scratch: np.ndarray) -> None:
        self._lc, self._ctx, self._vocab, self._index = lc, ctx, vocab, index
        self.grammar = grammar
        self._sampler = init_grammar(lc, vocab, grammar)
        self.active = not grammar.lazy
        self._at_start = True
        self._triggers = frozenset(grammar.trigger_tokens)
        self._prefixes = tuple(p.encode("utf-8") for p in grammar.trigger_prefixes)
        self._data = scratch                       # the engine's n_vocab candidates, reused by every sequence
        self._one = np.zeros(1, dtype=TOKEN_DATA)
        self._pending = b""                        # an unfinished UTF-8 character at the end of the reply
        self.resampled = 0                         # tokens the grammar refused and that were sampled again

    def free(self) -> None:
        if self._sampler:
            self._lc.llama_sampler_free(self._sampler)
            self._sampler = None

    def _apply(self, sampler: Any, data: np.ndarray, n: int) -> int:
        """Apply `sampler` to the first `n` candidates of `data`; the selected index (-1: none)."""
        lc = self._lc
        array = lc.llama_token_data_array(data=data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), size=n,
                                          selected=-1, sorted=False)
        lc.llama_sampler_apply(sampler, ctypes.byref(array))
        return int(array.selected)

    def allows(self, token: int) -> bool:
        piece = self._index.piece(token)
        if 0 in piece or not utf8_continues(self._pending, piece):
            return False
        one = self._one
        one[0] = (token, 1.0, 0.0)
        self._apply(self._sampler, one, 1)
        return bool(np.isfinite(one["logit"][0]))

    def sample(self, chain: Any, index: int) -> int:
        """The next token from row `index` of the last decode's logits."""
        lc, n_vocab = self._lc, self._index.n_vocab
        return self.sample_from(chain, np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, index),
                                                             shape=(n_vocab,)))

    def sample_from(self, chain: Any, logits: np.ndarray) -> int:
        """The next token from `logits` (n_vocab floats), the grammar's and the chain's state advanced."""
        lc, n_vocab = self._lc, self._index.n_vocab
        data = self._data
        data["id"] = np.arange(n_vocab, dtype=np.int32)
        data["logit"] = logits
        token = int(data["id"][self._apply(chain, data, n_vocab)])
        if not self.active:
            self._trigger(token)
        if self.active and not self.allows(token):
            token = self._resample(chain, logits)
        if self.active and not lc.llama_vocab_is_eog(self._vocab, token):  # the reply ends there: nothing to accept
            lc.llama_sampler_accept(self._sampler, token)
            self._pending = utf8_pending(self._pending, self._index.piece(token))
        lc.llama_sampler_accept(chain, token)
        return token

    def _trigger(self, token: int) -> None:
        if token in self._triggers:
            self.active = True
        elif self._at_start and self._prefixes:
            text = self._index.piece(token).lstrip()
            if text:
                self._at_start = False
                self.active = any(text.startswith(p) or p.startswith(text) for p in self._prefixes)

    def _resample(self, chain: Any, logits: np.ndarray) -> int:
        """The token sampled with the grammar applied first, from the candidates whose first byte it allows."""
        index = self._index
        index.build()
        probes = index.probes
        data = self._data
        n = len(probes)
        data["id"][:n] = probes
        data["logit"][:n] = 0.0
        self._apply(self._sampler, data, n)
        allowed = index.probe_bytes[np.isfinite(data["logit"][:n])]
        candidates = np.concatenate([index.unprobed, *(index.by_first_byte[b] for b in allowed)])
        pending = self._pending
        if pending:  # inside a character: the tokens that continue it
            size = 2 if pending[0] < 0xE0 else 3 if pending[0] < 0xF0 else 4
            candidates = candidates[index.continues[size - len(pending)][candidates]]
            if len(pending) == 1 and pending[0] in (0xE0, 0xED, 0xF0, 0xF4):  # leads that narrow the next byte
                candidates = np.array([t for t in candidates.tolist() if utf8_continues(pending, index.piece(t))],
                                      dtype=np.int32)
        else:
            candidates = candidates[index.whole_utf8[candidates]]
        candidates = np.concatenate([candidates, index.eog])
        m = len(candidates)
        data["id"][:m] = candidates
        data["logit"][:m] = logits[candidates]
        self._apply(self._sampler, data, m)
        if not np.isfinite(data["logit"][:m]).any():
            raise GrammarError("grammar", "no token of the vocabulary can continue the reply here")
        token = int(data["id"][self._apply(chain, data, m)])
        if not self.allows(token):  # the chain picked a refused candidate: never hand it to the grammar
            raise GrammarError("grammar", "the sampler chain chose a token the grammar refuses")
        self.resampled += 1
        return token
