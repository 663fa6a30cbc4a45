"""An atomic, streaming GGUF writer: metadata through gguf's GGUFWriter, tensor data appended chunk by chunk.

Every output file is written as `<name>.partial`, fsynced and renamed only when all of them are complete, so a
crash, Ctrl-C or full disk never leaves a half-written file at the output path. Splits follow llama.cpp's
`<stem>-00001-of-0000N.gguf` naming (gguf's SHARD_NAME_FORMAT) and metadata (`split.*`).

Large metadata arrays (a 128K-token vocabulary and its merges) are `PackedArray`s: GGUFWriter packs an array one
`struct.pack` per item, half a million calls for Llama 3's tokenizer; `BulkArrayWriter` serializes them with numpy
in one go, to the same bytes.
"""
from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, overload

import gguf
import numpy as np

from .errors import OutputError

# written data is handed to the disk every this many bytes instead of all at once by commit's fsync, so the disk writes
# while the converter computes; posix_fadvise(DONTNEED) starts writeback of dirty pages without waiting for it
WRITEBACK_BYTES = 32 << 20


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class PackedArray(Sequence[Any]):
    """A GGUF metadata array that `BulkArrayWriter` serializes in bulk.

    It is still the plain sequence of its values: gguf's own GGUFWriter writes it item by item, and the bulk path
    produces the same bytes (tests compare the two) or, for values it does not handle, leaves them to GGUFWriter."""

    def __init__(self, values: Sequence[Any]) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        return self.values[index]

    def to_bytes(self, endianess: gguf.GGUFEndian) -> bytes | None:
        """The array as a GGUF value without its own type tag (item type u32, count u64, the items), or None where
        only GGUFWriter's item-by-item path knows what to do (mixed types, bytes, values out of range)."""
        if not self.values:
            return None
        # GGUFWriter takes the item type from the first value and requires every other value to have the same;
        # one value of each Python type present stands for all values of that type
        kinds = list(map(type, self.values))
        try:
            item_type, *others = {gguf.GGUFValueType.get_type(self.values[kinds.index(k)]) for k in set(kinds)}
        except ValueError:
            return None
        if others or (item_type == gguf.GGUFValueType.STRING and set(kinds) != {str}):
            return None
        order = "<" if endianess == gguf.GGUFEndian.LITTLE else ">"
        items = (_pack_strings(self.values, order) if item_type == gguf.GGUFValueType.STRING
                 else _pack_numbers(self.values, item_type, order))
        if items is None:
            return None
        return struct.pack(f"{order}IQ", item_type, len(self)) + items


def _pack_strings(values: Sequence[str], order: str) -> bytes:
    """Each string as a u64 byte length and its UTF-8 bytes, built as one buffer."""
    encoded = list(map(str.encode, values))
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    out = np.empty(8 * len(encoded) + int(lengths.sum()), dtype=np.uint8)
    # the length prefixes sit at known offsets; the text fills the bytes between them, in order
    prefix_at = np.cumsum(lengths + 8) - (lengths + 8)
    is_prefix = np.zeros(out.size, dtype=bool)
    is_prefix[(prefix_at[:, None] + np.arange(8)).reshape(-1)] = True
    out[is_prefix] = lengths.astype(f"{order}u8").view(np.uint8)
    out[~is_prefix] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return out.tobytes()


def _pack_numbers(values: Sequence[Any], item_type: gguf.GGUFValueType, order: str) -> bytes | None:
    # the struct format GGUFWriter packs each item with is also the numpy dtype of the same bytes; a gguf release
    # without that (private) table gets GGUFWriter's own path, correct and slower
    fmt = getattr(gguf.GGUFWriter, "_simple_value_packing", {}).get(item_type)
    if fmt is None:
        return None
    dtype = np.dtype(order + fmt)
    try:
        wide = np.asarray(values, dtype={"f": np.float64, "i": np.int64}.get(dtype.kind, dtype))
    except OverflowError:
        return None
    with np.errstate(over="ignore"):
        packed = wide.astype(dtype)
    if dtype.kind == "i" and not np.array_equal(packed, wide):
        return None  # struct.pack refuses an int out of range; numpy would wrap it
    if dtype.kind == "f" and not np.array_equal(np.isinf(packed), np.isinf(wide)):
        return None  # struct.pack refuses a finite float too large for float32; numpy would make it inf
    return packed.tobytes()


class BulkArrayWriter(gguf.GGUFWriter):
    """GGUFWriter that writes `PackedArray` values with numpy instead of one struct.pack per item."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if isinstance(val, PackedArray) and vtype == gguf.GGUFValueType.ARRAY and sub_type is None:
            packed = val.to_bytes(self.endianess)
            if packed is not None:
                return (self._pack("I", vtype) if add_vtype else b"") + packed
        return super()._pack_val(val, vtype, add_vtype, sub_type)


class _PartialFilesWriter(BulkArrayWriter):
    """GGUFWriter that opens `<final>.partial` files instead of the final names."""

    final_paths: list[Path]

    def open_output_file(self, path: Path | None = None) -> None:
        assert self.path is not None
        self.final_paths = self.format_shard_names(self.path)
        self.fout = [open(partial_path(p), "wb") for p in self.final_paths]
        self.state = gguf.WriterState.EMPTY


@dataclass
class _PendingTensor:
    name: str
    nbytes: int
    file_index: int


def _output_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(path, "disk full while writing; nothing was left at the output path")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(path.parent, f"output directory is not writable ({exc.strerror})")
    return OutputError(path, f"cannot write: {exc.strerror or exc}")


class GGUFOutput:
    """Usage: add metadata via `.writer`, `add_tensor(...)` for each tensor, `open()`, then per tensor
    `write(bytes)` until its byte count is reached, and `commit()`; `abort()` (or an exception inside `with`)
    removes every partial file."""

    def __init__(self, path: Path, arch: str, *, split_max_size: int = 0, force: bool = False) -> None:
        self.path = path
        self.force = force
        self.writer = _PartialFilesWriter(path, arch, split_max_size=split_max_size)
        self._pending: list[_PendingTensor] = []
        self._current = 0
        self._written_in_current = 0
        self._opened = False
        self._handed_to_disk: list[int] = []  # per file: the offset up to which writeback has been started

    # ---- planning ------------------------------------------------------------------------------------------------
    def add_tensor(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, nbytes: int) -> None:
        # a non-uint8 dtype makes GGUFWriter take `shape` as the element shape; raw_dtype sets the ggml type
        self.writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._pending.append(_PendingTensor(name, nbytes, len(self.writer.tensors) - 1))

    @property
    def final_paths(self) -> list[Path]:
        return self.writer.format_shard_names(self.path)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self._pending)

    # ---- writing -------------------------------------------------------------------------------------------------
    def open(self) -> None:
        targets = self.final_paths
        existing = [p for p in targets if p.exists()]
        if existing and not self.force:
            raise OutputError(existing[0], "already exists (use --force to overwrite)")
        if not self.path.parent.is_dir():
            raise OutputError(self.path.parent, "output directory does not exist")
        if not os.access(self.path.parent, os.W_OK):
            raise OutputError(self.path.parent, "output directory is not writable")
        try:
            self.writer.write_header_to_file()
            self.writer.write_kv_data_to_file()
            self.writer.write_ti_data_to_file()
            for fout in self._files:
                self.writer.write_padding(fout, fout.tell())
        except OSError as exc:
            self.abort()
            raise _output_error(self.path, exc) from exc
        self._handed_to_disk = [0] * len(self._files)
        self._opened = True

    @property
    def _files(self) -> list[BinaryIO]:
        assert self.writer.fout is not None
        return self.writer.fout  # type: ignore[return-value]

    def _finish_tensor(self) -> None:
        tensor = self._pending[self._current]
        self.writer.write_padding(self._files[tensor.file_index], tensor.nbytes)
        self._current += 1
        self._written_in_current = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes of the current tensor; moves to the next tensor when this one is complete."""
        tensor = self._pending[self._current]
        if self._written_in_current + len(data) > tensor.nbytes:
            raise ValueError(f"{tensor.name}: {self._written_in_current + len(data)} bytes exceed {tensor.nbytes}")
        fout = self._files[tensor.file_index]
        try:
            fout.write(data)
            self._hand_to_disk(tensor.file_index, fout)
        except OSError as exc:
            self.abort()
            raise _output_error(self.final_paths[tensor.file_index], exc) from exc
        self._written_in_current += len(data)
        if self._written_in_current == tensor.nbytes:
            self._finish_tensor()

    def _hand_to_disk(self, index: int, fout: BinaryIO) -> None:
        start, end = self._handed_to_disk[index], fout.tell()
        if end - start < WRITEBACK_BYTES or not hasattr(os, "posix_fadvise"):
            return
        fout.flush()
        try:
            os.posix_fadvise(fout.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # an optimisation only: commit's fsync writes whatever is still dirty
        self._handed_to_disk[index] = end

    def commit(self) -> list[Path]:
        if self._current != len(self._pending):
            missing = self._pending[self._current].name
            self.abort()
            raise ValueError(f"tensor data incomplete at {missing}")
        finals = self.final_paths
        try:
            for fout in self._files:
                fout.flush()
                os.fsync(fout.fileno())
            self.writer.close()
            for final in finals:
                os.replace(partial_path(final), final)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.abort()
            raise _output_error(self.path, exc) from exc
        return finals

    def abort(self) -> None:
        self.writer.close()
        for final in self.final_paths:
            try:
                partial_path(final).unlink()
            except OSError:  # never there (read-only directory, failed open): nothing to remove
                pass

    def __enter__(self) -> "GGUFOutput":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()
