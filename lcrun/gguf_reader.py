"""One reader of GGUF headers for the whole application: key/values and tensor infos, from a local file (memory
mapped) or from a prefix of a remote one (range reads, `parse_gguf_header` raising `NeedMoreBytes`).

Every count, length and offset is checked against the bytes there are before anything is allocated, so a corrupt
file is a one-line error, never a multi-GB allocation or a walk through gigabytes. The tokenizer's big arrays (128K-262K
token strings, 280K merges, scores, types) are not decoded: numeric arrays are stepped over by their byte length,
string arrays by their length prefixes, found with numpy over the raw bytes, and each is kept as its raw bytes in a
`GGUFArray` that decodes only what a caller asks for (one token's text, the id of a token, the whole list).
"""
from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GGUFFileError

GGUF_MAGIC_BYTES = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4              # llama.cpp refuses tensors of more dimensions
EAGER_ARRAY_LIMIT = 1024       # arrays up to this length are decoded to lists at once (per-layer values, names)
# gguf-split and GGUFWriter(split_max_*) name the files `<prefix>-00001-of-00003.gguf`
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_COUNT_KEY = "split.count"

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


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int                  # a ggml_type number (gguf.GGMLQuantizationType)
    ne: tuple[int, ...]             # ggml order: ne[0] (the row length) first
    offset: int                     # from the start of the data section
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (rows last dimension first), as gguf-py and the estimator use it."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name


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


@dataclass
class GGUFHeader:
    source: str                     # the file (or "repo/file") the header came from, for messages
    version: int
    byte_order: str                 # "<" or ">"
    fields: dict[str, Any]          # scalars, str, lists (short arrays), GGUFArray (long arrays)
    tensors: list[TensorInfo]
    alignment: int
    header_size: int                # bytes up to the end of the tensor infos
    data_offset: int                # where tensor data starts
    file_size: int | None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def chat_template(self) -> str | None:
        value = self.fields.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value else None

    @property
    def tokens(self) -> GGUFArray | list[str] | None:
        value = self.fields.get("tokenizer.ggml.tokens")
        return value if isinstance(value, (GGUFArray, list)) else None

    def token_id(self, text: str) -> int | None:
        """The id of the token whose text is exactly `text`, or None."""
        tokens = self.tokens
        if isinstance(tokens, GGUFArray):
            return tokens.index_of(text)
        if isinstance(tokens, list):
            return tokens.index(text) if text in tokens else None
        return None

    def has_token(self, text: str) -> bool:
        return self.token_id(text) is not None

    def token_text(self, token: int) -> str | None:
        tokens = self.tokens
        if tokens is None or not 0 <= token < len(tokens):
            return None
        return tokens[token]


# ---- parsing -------------------------------------------------------------------------------------------------------

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

    def value(self, kind: int, *, decode_limit: int = EAGER_ARRAY_LIMIT) -> Any:
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
            return self.array(decode_limit)
        raise HeaderError(f"corrupt header: unknown value type {kind} at byte {self.pos - 4}")

    def array(self, decode_limit: int) -> Any:
        at = self.pos
        item = self.u32("an array type")
        if item not in _MIN_ITEM:
            raise HeaderError(f"corrupt header: unknown array element type {item} at byte {at}")
        length = self.u64("an array length")
        room = self.limit - self.pos
        if length * _MIN_ITEM[item] > room and (self.complete or length > (1 << 40)):
            raise HeaderError(f"truncated or corrupt header: an array at byte {at} claims {length} entries, more "
                              f"than the {self.limit}-byte file can hold")
        start = self.pos
        offsets = None
        if item in _SCALAR_CODES:
            self.need(length * _MIN_ITEM[item], "an array")
            self.pos += length * _MIN_ITEM[item]
        elif item == STRING:
            offsets = self.skip_strings(length)
        else:
            for _ in range(length):
                self.value(ARRAY, decode_limit=0)
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


def parse_gguf_header(buf: Any, source: str, *, complete: bool, file_size: int | None = None) -> GGUFHeader:
    """The header in `buf`: the whole file (`complete`, a memory map is fine) or a prefix of it (then NeedMoreBytes
    says how far to read). HeaderError for anything malformed."""
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC_BYTES[:len(magic)]:
        raise HeaderError(f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC_BYTES!r})")
    if len(magic) < 4:
        if not complete:
            raise NeedMoreBytes(24)
        raise HeaderError(f"truncated: {len(buf)} bytes is too short for a GGUF header")
    cursor = _Cursor(buf, "<", complete=complete)
    cursor.pos = 4
    version = cursor.u32("the version")
    if version & 0xFFFF == 0:  # written big-endian, as gguf-py detects it
        cursor = _Cursor(buf, ">", complete=complete, pos=4)
        version = cursor.u32("the version")
    if version not in (2, 3):
        raise HeaderError(f"unsupported GGUF version {version} (versions 2 and 3 are read)")
    tensor_count = cursor.u64("the tensor count")
    cursor.check_claim(tensor_count, 24, 8, f"the tensor count {tensor_count}")
    kv_count = cursor.u64("the key/value count")
    cursor.check_claim(kv_count, 13, 16, f"the key/value count {kv_count}")
    if not complete and (tensor_count > 1 << 24 or kv_count > 1 << 24):
        raise HeaderError(f"corrupt header: {tensor_count} tensors and {kv_count} keys")

    fields: dict[str, Any] = {}
    for _ in range(kv_count):
        key_at = cursor.pos
        key = cursor.string("a key")
        kind = cursor.u32(f"the type of {key}")
        if key in fields:
            raise HeaderError(f"corrupt header: key {key!r} appears twice (again at byte {key_at})")
        fields[key] = cursor.value(kind)

    alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise HeaderError(f"corrupt header: general.alignment is {alignment!r} (a power of two is needed)")

    sizes = _quant_sizes()
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for _ in range(tensor_count):
        name = cursor.string("a tensor name")
        n_dims = cursor.u32(f"the dimensions of {name}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise HeaderError(f"corrupt header: tensor {name!r} has {n_dims} dimensions")
        ne = tuple(cursor.u64(f"the shape of {name}") for _ in range(n_dims))
        ggml_type = cursor.u32(f"the type of {name}")
        offset = cursor.u64(f"the offset of {name}")
        if ggml_type not in sizes:
            raise HeaderError(f"tensor {name!r} has ggml type {ggml_type}, which this gguf package does not know "
                              "(a newer llama.cpp format?)")
        block, type_size = sizes[ggml_type]
        if ne[0] % block:
            raise HeaderError(f"corrupt header: tensor {name!r} rows of {ne[0]} are not a multiple of the "
                              f"{block}-element blocks of its type")
        n_elements = 1
        for d in ne:
            n_elements *= d
        if n_elements > 1 << 50:
            raise HeaderError(f"corrupt header: tensor {name!r} claims {n_elements} elements")
        if offset % alignment:
            raise HeaderError(f"corrupt header: tensor {name!r} data at offset {offset} is not {alignment}-aligned")
        if name in names:
            raise HeaderError(f"corrupt header: tensor {name!r} appears twice")
        names.add(name)
        tensors.append(TensorInfo(name, ggml_type, ne, offset, n_elements // block * type_size))

    header_size = cursor.pos
    data_offset = -(-header_size // alignment) * alignment
    if file_size is not None:
        for t in tensors:
            end = data_offset + t.offset + t.n_bytes
            if end > file_size:
                raise HeaderError(f"truncated: tensor data of {t.name!r} ends at byte {end} but the file has "
                                  f"{file_size}")
    return GGUFHeader(source=source, version=version, byte_order=cursor.order, fields=fields, tensors=tensors,
                      alignment=alignment, header_size=header_size, data_offset=data_offset, file_size=file_size)


_QUANT_SIZES: dict[int, tuple[int, int]] = {}


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type number -> (block size, bytes per block), from gguf-py's table (imported when first needed)."""
    if not _QUANT_SIZES:
        from gguf import GGML_QUANT_SIZES

        _QUANT_SIZES.update({int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()})
    return _QUANT_SIZES


# ---- local files and split sets -----------------------------------------------------------------------------------

def _check_is_gguf_file(path: Path) -> int:
    try:
        if not path.exists():
            raise GGUFFileError(path, "no such file")
        if path.is_dir():
            raise GGUFFileError(path, "is a directory, not a GGUF file")
        if not path.is_file():
            raise GGUFFileError(path, "not a regular file")
        size = path.stat().st_size
    except OSError as err:
        raise GGUFFileError(path, f"cannot read: {err.strerror or err}") from err
    if size == 0:
        raise GGUFFileError(path, "empty file (0 bytes)")
    return size


def read_gguf_header(path: Path) -> GGUFHeader:
    """One local GGUF file's header, memory-mapped: only the pages the header spans are read."""
    path = Path(path)
    size = _check_is_gguf_file(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return parse_gguf_header(mapped, str(path), complete=True, file_size=size)
    except HeaderError as err:
        raise GGUFFileError(path, err.problem) from None
    except OSError as err:
        raise GGUFFileError(path, f"cannot read: {err.strerror or err}") from err


def read_tensor_data(path: Path, header: GGUFHeader, tensor: TensorInfo) -> bytes:
    """The bytes of one (small) tensor."""
    with Path(path).open("rb") as f:
        f.seek(header.data_offset + tensor.offset)
        return f.read(tensor.n_bytes)


@dataclass
class GGUFSet:
    """A GGUF model as llama.cpp opens it: the file named, and the other files of its split set."""
    path: Path                                   # the file the user named
    headers: list[tuple[Path, GGUFHeader]]       # every split found, in order
    split_count: int
    missing: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first_found: bool = True                     # whether the split holding the model's metadata is here

    @property
    def meta(self) -> GGUFHeader:
        """The header with the model's metadata: llama.cpp reads it from the first split."""
        return self.headers[0][1] if self.first_found else self.given

    @property
    def given(self) -> GGUFHeader:
        return next(h for p, h in self.headers if p == self.path)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.headers]

    @property
    def file_size(self) -> int:
        return sum(h.file_size or 0 for _, h in self.headers)

    def tensors(self) -> Iterator[tuple[Path, GGUFHeader, TensorInfo]]:
        for path, header in self.headers:
            for tensor in header.tensors:
                yield path, header, tensor


def split_set_paths(path: Path, header: GGUFHeader) -> tuple[list[Path], int, list[str]]:
    """(paths of the declared split set, declared count, warnings) for the file the user named."""
    count = header.get(SPLIT_COUNT_KEY)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 1:
        return [path], 1, []
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path], count, [f"split set incomplete: this file is one of {count} splits, but its name does not "
                               "follow <name>-00001-of-000NN.gguf, so the others cannot be found"]
    return [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)], count, []


def read_gguf_set(path: Path) -> GGUFSet:
    """The named file's header and those of the rest of its split set (each file read once)."""
    path = Path(path)
    given = read_gguf_header(path)
    expected, count, warnings = split_set_paths(path, given)
    headers: list[tuple[Path, GGUFHeader]] = []
    missing: list[Path] = []
    for p in expected:
        if p == path:
            headers.append((p, given))
        elif p.exists():
            headers.append((p, read_gguf_header(p)))
        else:
            missing.append(p)
    if missing:
        names = ", ".join(p.name for p in missing)
        warnings.append(f"split set incomplete: found {len(headers)} of {count} files, missing {names}")
    return GGUFSet(path, headers, count, missing, warnings, first_found=headers[0][0] == expected[0])


__all__ = ["GGUFArray", "GGUFHeader", "GGUFSet", "HeaderError", "NeedMoreBytes", "TensorInfo", "parse_gguf_header",
           "read_gguf_header", "read_gguf_set", "read_tensor_data", "split_set_paths"]
