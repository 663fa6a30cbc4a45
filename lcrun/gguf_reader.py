"""One reader of GGUF headers for the whole application: key/values and tensor infos, from a local file (memory
mapped) or from a prefix of a remote one (range reads, `parse_gguf_header` raising `NeedMoreBytes`). The values
themselves are read by lcrun.gguf_values; a file's split set by lcrun.gguf_split.

Every count, length and offset is checked against the bytes there are before anything is allocated, so a corrupt
file is a one-line error, never a multi-GB allocation or a walk through gigabytes.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GGUFFileError
from .gguf_values import GGUFArray, HeaderError, NeedMoreBytes, _Cursor

GGUF_MAGIC_BYTES = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4              # llama.cpp refuses tensors of more dimensions


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
