"""The values of a GGUF header as the file format lays them out: scalars, strings, and arrays — read by a cursor that
checks every count and length against the bytes there are before anything is allocated (lcrun.gguf_reader drives it).

The tokenizer's big arrays (128K-262K token strings, 280K merges, scores, types) are not decoded: numeric arrays are
stepped over by their byte length, string arrays by their length prefixes, found with numpy over the raw bytes, and
each is kept as its raw bytes in a `GGUFArray` that decodes only what a caller asks for (one token's text, the id of a
token, the whole list).
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

EAGER_ARRAY_LIMIT = 1024       # arrays up to this length are decoded to lists at once (per-layer values, names)
# arrays of arrays: llama.cpp's reader refuses them outright, gguf-py reads any depth (by recursion, as here); a
# header nesting thousands deep would otherwise end in a RecursionError
MAX_ARRAY_DEPTH = 8

# GGUFValueType (gguf-py constants): the numbering is the file format's
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_CODES = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
                 UINT64: "Q", INT64: "q", FLOAT64: "d"}
_NUMPY_CODES = {UINT8: "u1", INT8: "i1", UINT16: "u2", INT16: "i2", UINT32: "u4", INT32: "i4", FLOAT32: "f4",
                BOOL: "?", UINT64: "u8", INT64: "i8", FLOAT64: "f8"}
_MIN_ITEM = {**{k: struct.calcsize(c) for k, c in _SCALAR_CODES.items()}, STRING: 8, ARRAY: 12}


class HeaderError(Exception):
    """The header is malformed: `problem` says how, in words for users."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class NeedMoreBytes(Exception):
    """Parsing a prefix of a file ran off its end: at least `at_least` bytes are needed."""

    def __init__(self, at_least: int) -> None:
        super().__init__(at_least)
        self.at_least = at_least


class GGUFArray:
    """An array value kept as its raw bytes; decoded on demand. For strings, `offsets` holds where each element's
    length prefix starts (relative to the raw bytes)."""

    def __init__(self, element_type: int, length: int, raw: bytes, order: str,
                 offsets: np.ndarray | None = None) -> None:
        self.element_type, self.length, self.raw, self.order, self._offsets = element_type, length, raw, order, offsets

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"GGUFArray(type={self.element_type}, length={self.length}, {len(self.raw)} bytes)"

    def to_numpy(self) -> np.ndarray:
        if self.element_type not in _NUMPY_CODES:
            raise TypeError("only numeric arrays have a numpy form")
        return np.frombuffer(self.raw, dtype=np.dtype(self.order + _NUMPY_CODES[self.element_type]), count=self.length)

    def _string_at(self, start: int) -> str:
        n = int.from_bytes(self.raw[start:start + 8], "little" if self.order == "<" else "big")
        return self.raw[start + 8:start + 8 + n].decode("utf-8", errors="replace")

    def __getitem__(self, index: int) -> Any:
        if not -self.length <= index < self.length:
            raise IndexError(index)
        index %= self.length
        if self.element_type == STRING:
            assert self._offsets is not None
            return self._string_at(int(self._offsets[index]))
        if self.element_type == ARRAY:
            return self.tolist()[index]
        return self.to_numpy()[index].item()

    def tolist(self) -> list[Any]:
        if self.element_type == STRING:
            assert self._offsets is not None
            return [self._string_at(int(o)) for o in self._offsets]
        if self.element_type == ARRAY:
            return _Cursor(self.raw, self.order, complete=True).array_items(self.length)
        return self.to_numpy().tolist()

    def index_of(self, text: str) -> int | None:
        """The first element equal to `text` (string arrays): a byte search for its length prefix and bytes."""
        if self.element_type != STRING or self._offsets is None:
            return None
        data = text.encode("utf-8")
        needle = struct.pack(self.order + "Q", len(data)) + data
        at = self.raw.find(needle)
        while at >= 0:
            i = int(np.searchsorted(self._offsets, at))
            if i < self.length and self._offsets[i] == at:
                return i
            at = self.raw.find(needle, at + 1)
        return None


class _Cursor:
    """Reads GGUF values from `buf` (bytes or a memory map). In a prefix of the file (`complete=False`), running off
    the end raises NeedMoreBytes; in a whole file it is a HeaderError saying the file is truncated."""

    def __init__(self, buf: Any, order: str, *, complete: bool, pos: int = 0, limit: int | None = None) -> None:
        self.buf, self.order, self.complete, self.pos = buf, order, complete, pos
        self.limit = len(buf) if limit is None else limit
        self._u32 = struct.Struct(order + "I")
        self._u64 = struct.Struct(order + "Q")

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if end > self.limit:
            if not self.complete:
                raise NeedMoreBytes(end)
            raise HeaderError(f"truncated: header needs {end} bytes but the file has {self.limit} ({what})")

    def u32(self, what: str) -> int:
        self.need(4, what)
        value = self._u32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value = self._u64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u64(what)
        self.check_claim(n, 1, at, f"a string of {n} bytes ({what})")
        data = self.raw(n, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")

    def check_claim(self, count: int, item_size: int, at: int, what: str) -> None:
        """A length that the bytes after it cannot hold is corruption, said at once (not after reading to EOF)."""
        room = self.limit - self.pos
        if count * item_size > room and self.complete:
            raise HeaderError(f"truncated or corrupt header: {what} at byte {at}, more than the "
                              f"{self.limit}-byte file can hold")

    def value(self, kind: int, *, decode_limit: int = EAGER_ARRAY_LIMIT, depth: int = 0) -> Any:
        code = _SCALAR_CODES.get(kind)
        if code is not None:
            size = struct.calcsize(code)
            self.need(size, "a value")
            value = struct.unpack_from(self.order + code, self.buf, self.pos)[0]
            self.pos += size
            return value
        if kind == STRING:
            return self.string("a string value")
        if kind == ARRAY:
            return self.array(decode_limit, depth)
        raise HeaderError(f"corrupt header: unknown value type {kind} at byte {self.pos - 4}")

    def array(self, decode_limit: int, depth: int = 0) -> Any:
        at = self.pos
        if depth >= MAX_ARRAY_DEPTH:
            raise HeaderError(f"corrupt header: arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {at}")
        item = self.u32("an array type")
        if item not in _MIN_ITEM:
            raise HeaderError(f"corrupt header: unknown array element type {item} at byte {at}")
        length = self.u64("an array length")
        room = self.limit - self.pos
        if length * _MIN_ITEM[item] > room and (self.complete or length > (1 << 40)):
            raise HeaderError(f"truncated or corrupt header: an array at byte {at} claims {length} entries, more "
                              f"than the {self.limit}-byte file can hold")
        # the smallest bytes the entries can take, before anything is sized by `length`: in a prefix of a remote
        # file this asks for that many bytes (the caller bounds how far it reads) instead of allocating for them
        self.need(length * _MIN_ITEM[item], "an array")
        start = self.pos
        offsets = None
        if item in _SCALAR_CODES:
            self.pos += length * _MIN_ITEM[item]
        elif item == STRING:
            offsets = self.skip_strings(length)
        else:
            for _ in range(length):
                self.value(ARRAY, decode_limit=0, depth=depth + 1)
        kept = GGUFArray(item, length, bytes(self.buf[start:self.pos]), self.order,
                         None if offsets is None else offsets - start)
        return kept.tolist() if length <= decode_limit else kept

    def array_items(self, length: int) -> list[Any]:
        """The elements of a nested array's raw bytes (each an array itself)."""
        return [self.value(ARRAY, decode_limit=1 << 62) for _ in range(length)]

    def skip_strings(self, n: int) -> np.ndarray:
        """Step over `n` length-prefixed strings; return where each starts. numpy finds them over the raw bytes; a
        plain walk is the fallback where the fast way cannot prove its answer."""
        found = _string_starts_fast(self.buf, self.pos, n, self.limit, self.order)
        if found is None:
            return self._walk_strings(n)
        starts, end = found
        self.pos = end
        return starts

    def _walk_strings(self, n: int) -> np.ndarray:
        starts = np.empty(n, dtype=np.int64)
        unpack, buf = self._u64.unpack_from, self.buf
        pos, limit = self.pos, self.limit
        for i in range(n):
            if pos + 8 > limit:
                self.pos = pos
                self.need(8, "a string length")
            size = unpack(buf, pos)[0]
            starts[i] = pos
            if pos + 8 + size > limit:
                self.pos = pos + 8
                self.check_claim(size, 1, pos, f"a string of {size} bytes")
                self.need(size, "a string")
            pos += 8 + size
        self.pos = pos
        return starts


def _string_starts_fast(buf: Any, start: int, n: int, limit: int, order: str) -> tuple[np.ndarray, int] | None:
    """Where `n` consecutive length-prefixed strings start, and where they end, or None when this way cannot say.

    Token and merge strings hold no NUL bytes, while a little-endian u64 length below 2**56 ends in one; so each
    length prefix ends at a zero byte followed by a non-zero one (the text), and those places are the candidates.
    The answer is accepted only if the chain checks exactly: the first string starts at `start` and each one ends
    where the next begins. Empty strings, NULs in text or big-endian files fail the check and take the walk."""
    if order != "<" or n < 64:
        return None
    window = min(limit - start, n * 24 + 64)
    while window > 8:
        b = np.frombuffer(buf, dtype=np.uint8, count=window, offset=start)
        zero = b == 0
        heads = np.flatnonzero(zero[:-1] & ~zero[1:]) - 7  # a prefix ending at byte i (then text) starts at i - 7
        if len(heads) >= n:
            heads = heads[:n]
            if heads[0] != 0 or heads[-1] + 8 > window:
                return None
            # the lengths, read as three bytes: the candidates already end in a zero byte, bytes 3-6 must be zero too
            sizes = b[heads].astype(np.int64) | (b[heads + 1].astype(np.int64) << 8) | (
                b[heads + 2].astype(np.int64) << 16)
            high = b[heads + 3] | b[heads + 4] | b[heads + 5] | b[heads + 6]
            if high.any():
                return None
            ends = heads + 8 + sizes
            if ends[-1] > window or not np.array_equal(ends[:-1], heads[1:]):
                return None
            return heads + start, start + int(ends[-1])
        if window >= limit - start:
            return None
        window = min(limit - start, window * 2)
    return None
