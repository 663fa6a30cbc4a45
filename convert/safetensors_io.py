"""A lazy, validating reader of a checkpoint's (sharded) safetensors files.

Every header is parsed and checked before anything is converted: a truncated file, offsets out of range, a shard the
index names but that is missing, an unsupported dtype, an FP8 weight without its scale — each is one error naming the
file. Data is read through one read-only `mmap` per shard; the pages a read touched are released right after the rows
are copied out, so resident memory stays at a chunk, not the model. Reads share no file position, so threads may read
different tensors or rows at once.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from . import fp8
from .errors import CheckpointError, UnsupportedModelError
from .fp8 import Fp8Scheme
from .int_packed import Rounding
from .quant_config import QuantScheme, detect_scheme
from .quant_reader import QuantReader
from .quantized import Header, Q, QuantSource, classify

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_NUMPY_DTYPES: dict[str, Any] = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, **fp8.FP8_DTYPES,
    "F64": np.float64, "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_,
}
# safetensors codes numpy has no type for; their size still lets us validate the header
_OTHER_ITEMSIZES = {"F8_E8M0": 1}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)
_WHOLE_CACHE = 6  # GPTQ/AWQ: qweight, qzeros and scales of the two tensors the two encoder threads work on


@dataclass(frozen=True)
class _Tensor:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int   # absolute position of the data in the file
    nbytes: int

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.n_rows if self.n_rows else 0


def _release(mm: mmap.mmap, offset: int, length: int) -> None:
    """Drop the pages of [offset, offset + length) from this process's resident set.

    The map is shared and read-only, so dropping a page another thread is reading is harmless: its next access faults
    the page back in from the page cache."""
    if _MADV_DONTNEED is None or length <= 0:
        return
    start = offset - offset % mmap.PAGESIZE  # madvise needs a page-aligned start; the kernel rounds the length up
    try:
        mm.madvise(_MADV_DONTNEED, start, offset + length - start)
    except (OSError, ValueError):
        pass  # an optimisation only: where the platform refuses, pages are reclaimed under pressure as usual


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


class _DuplicateKey(ValueError):
    pass


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header(path: Path) -> list[_Tensor]:
    """The tensors of one safetensors file in data order, every entry validated against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"only {size} bytes: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if 8 + n > size or n > _MAX_HEADER:
                raise CheckpointError(path, f"header length {n} runs past the end of the file ({size} bytes): "
                                            "truncated, or not a safetensors file")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(path, f"header names {exc} twice") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")

    data_start, data_size = 8 + n, size - 8 - n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name}"
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list) and all(_is_count(d) for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(_is_count(o) for o in info["data_offsets"])):
            raise CheckpointError(path, f"{where}: malformed header entry {json.dumps(info)[:200]}")
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize if dtype in _NUMPY_DTYPES else _OTHER_ITEMSIZES.get(dtype)
        if itemsize is None:
            raise UnsupportedModelError(path, f"{where} has dtype {dtype}, which lcrun cannot read")
        if end < begin:
            raise CheckpointError(path, f"{where}: data offsets [{begin}, {end}] end before they begin")
        if end > data_size:
            raise CheckpointError(path, f"{where}: data offsets [{begin}, {end}] run past the end of the data "
                                        f"({data_size} bytes): truncated?")
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            raise CheckpointError(path, f"{where}: {end - begin} bytes of data for shape {list(shape)} of {dtype} "
                                        f"({expected} expected)")
        tensors.append(_Tensor(name, path, dtype, shape, data_start + begin, end - begin))
    return sorted(tensors, key=lambda t: t.offset)


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(index_path, f"lists {exc} twice") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(index_path, f"not a readable JSON index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) and v for v in weight_map.values())):
        raise CheckpointError(index_path, "no 'weight_map' object mapping tensor names to shard file names")
    return weight_map


class Checkpoint:
    """The tensors of a checkpoint folder. `names` lists the weights to export, in file order; FP8 scales and zero
    points are consumed by `rows`, activation scales dropped; a 4-bit or packed-integer weight is listed once, by its
    logical name (`<module>.weight`), its parts consumed (quantized.py)."""

    def __init__(self, model_dir: Path, quantization_config: dict[str, Any] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.quant: QuantScheme | None = detect_scheme(quantization_config, self.model_dir / "config.json")
        self.scheme: Fp8Scheme | None = self.quant.fp8 if self.quant else None
        self.rounding = Rounding()
        self._maps: dict[Path, mmap.mmap] = {}
        self._tensors: dict[str, _Tensor] = {}
        self._fp8: dict[str, fp8.Fp8Binding] = {}
        self._quantized: dict[str, QuantReader] = {}
        self._whole_cache: dict[str, np.ndarray] = {}
        self._whole_lock = threading.Lock()
        self.names: list[str] = []
        try:
            self._load()
            headers = {n: Header(t.dtype, t.shape, t.file) for n, t in self._tensors.items()}
            sources, consumed = classify(headers, self.quant)
            by_part = {s.parts["packed"]: s for s in sources.values()}
            for name in self._tensors:
                if name in by_part:
                    self.names.append(by_part[name].name)
                elif name not in consumed and not fp8.is_auxiliary(name):
                    self.names.append(name)
            for name in self.names:
                if name in sources:
                    self._quantized[name] = QuantReader(sources[name], headers, self._rows_of, self._whole)
                    continue
                tensor = self._tensors[name]
                if tensor.dtype not in WEIGHT_DTYPES:
                    raise UnsupportedModelError(tensor.file, f"tensor {name} has dtype {tensor.dtype}; "
                                                             f"weights must be one of {', '.join(WEIGHT_DTYPES)}")
                if tensor.dtype in fp8.FP8_DTYPES:
                    self._fp8[name] = fp8.bind(tensor, self._tensors, self.scheme)
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        index_path = self.model_dir / INDEX_NAME
        if index_path.is_file():
            weight_map = _read_index(index_path)
            wanted: dict[Path, list[str]] = {}
            for name, filename in weight_map.items():
                wanted.setdefault(self.model_dir / filename, []).append(name)
            files = sorted(wanted)
            for path in files:
                if not path.is_file():
                    raise CheckpointError(path, f"missing, but {INDEX_NAME} maps {len(wanted[path])} tensor(s) to it "
                                                f"(e.g. {wanted[path][0]})")
        elif self.model_dir.is_dir():
            files = sorted(self.model_dir.glob("*.safetensors"))
            wanted = {}
        else:
            raise CheckpointError(self.model_dir, "not a directory")
        if not files:
            other = sorted(p.name for p in self.model_dir.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".gguf"))
            hint = f" (found {other[0]}: only safetensors checkpoints are read)" if other else ""
            raise CheckpointError(self.model_dir, f"no *.safetensors weights{hint}")

        for path in files:
            tensors = _read_header(path)
            if wanted:
                present = {t.name for t in tensors}
                absent = [n for n in wanted[path] if n not in present]
                if absent:
                    raise CheckpointError(path, f"has no tensor {absent[0]}, which {INDEX_NAME} says it holds")
                listed = set(wanted[path])
                tensors = [t for t in tensors if t.name in listed]
            for tensor in tensors:
                if tensor.name in self._tensors:
                    other = self._tensors[tensor.name].file.name
                    raise CheckpointError(path, f"tensor {tensor.name} is also in {other}")
                self._tensors[tensor.name] = tensor
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    # ---- queries -------------------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        reader = self._quantized.get(name)
        return reader.source.shape if reader else self._tensors[name].shape

    def dtype(self, name: str) -> str:
        reader = self._quantized.get(name)
        return reader.source.kind.upper() if reader else self._tensors[name].dtype

    def is_fp8(self, name: str) -> bool:
        return name in self._fp8

    def quantized(self, name: str) -> QuantSource | None:
        reader = self._quantized.get(name)
        return reader.source if reader else None

    def tensor_factor(self, name: str) -> float | None:
        """NVFP4's per-tensor multiplier (ModelOpt weight_scale_2, 1 / compressed-tensors weight_global_scale)."""
        reader = self._quantized.get(name)
        return reader.factor if reader else None

    def nbytes(self, name: str) -> int:
        reader = self._quantized.get(name)
        if reader:
            return sum(self._tensors[p].nbytes for p in reader.source.parts.values())
        return self._tensors[name].nbytes

    def file_of(self, name: str) -> Path:
        reader = self._quantized.get(name)
        return self._tensors[reader.source.parts["packed"] if reader else name].file

    # ---- data ----------------------------------------------------------------------------------------------------
    def rows(self, name: str, start: int, stop: int, index: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) along axis 0 — with `index`, the source rows index[start:stop] — as a fresh array in the
        source dtype; FP8 weights come back decoded to float32."""
        reader = self._quantized.get(name)
        if reader is not None:
            return reader.rows(self._ids(name, start, stop, index))
        tensor = self._tensors[name]
        _check_range(tensor, start, stop)
        ids = np.arange(start, stop) if index is None else np.asarray(index[start:stop], dtype=np.int64)
        binding = self._fp8.get(name)
        if binding is None:
            return self._read(tensor, ids, gather=index is not None)
        values = self._read(tensor, ids, gather=index is not None, as_float32=True)
        lo, hi = (int(ids.min()), int(ids.max()) + 1) if ids.size else (0, 0)
        first, last = fp8.scale_rows(binding.layout, lo, hi, binding.scale.n_rows, binding.block)
        window = np.arange(first, last)
        scale = self._read(binding.scale, window, gather=False, as_float32=True)
        zero_point = (None if binding.zero_point is None
                      else self._read(binding.zero_point, window, gather=False, as_float32=True))
        return fp8.decode(values, ids, scale, zero_point, first, binding.layout, binding.block)

    def blocks(self, name: str, qtype: Q, start: int, stop: int, index: np.ndarray | None = None) -> bytes:
        """Rows [start, stop) of a quantized weight (through `index` as in `rows`) as the ggml blocks of `qtype`,
        its source's exact_type: the stored values, repacked."""
        ids = self._ids(name, start, stop, index)
        return self._quantized[name].blocks(ids, qtype, self.rounding).tobytes()

    def _ids(self, name: str, start: int, stop: int, index: np.ndarray | None) -> np.ndarray:
        n_rows = self.shape(name)[0]
        if not 0 <= start <= stop <= n_rows:
            raise IndexError(f"{name}: rows [{start}, {stop}) outside [0, {n_rows})")
        return np.arange(start, stop) if index is None else np.asarray(index[start:stop], dtype=np.int64)

    def _rows_of(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self._read(self._tensors[name], ids, gather=True)

    def _whole(self, name: str) -> np.ndarray:
        """A whole (small, or input-major) tensor; the last few are kept, for GPTQ/AWQ's column slices."""
        with self._whole_lock:
            cached = self._whole_cache.get(name)
            if cached is None:
                tensor = self._tensors[name]
                cached = self._read(tensor, np.arange(tensor.n_rows), gather=False)
                if tensor.shape == ():
                    cached = cached.reshape(())
                while len(self._whole_cache) >= _WHOLE_CACHE:
                    self._whole_cache.pop(next(iter(self._whole_cache)))
                self._whole_cache[name] = cached
            return cached

    def raw_bytes(self, name: str, start: int, stop: int) -> bytes:
        """The stored bytes of rows [start, stop), for copying a tensor through unchanged."""
        tensor = self._tensors[name]
        _check_range(tensor, start, stop)
        offset, length = tensor.offset + start * tensor.row_nbytes, (stop - start) * tensor.row_nbytes
        mm = self._map(tensor)
        data = mm[offset:offset + length]
        _release(mm, offset, length)
        return data

    def _read(self, tensor: _Tensor, ids: np.ndarray, *, gather: bool, as_float32: bool = False) -> np.ndarray:
        """Copy the rows `ids` (consecutive unless `gather`) out of the map, then release the pages they lay on."""
        dtype = np.dtype(np.float32 if as_float32 else _NUMPY_DTYPES[tensor.dtype])
        row_shape = tensor.shape[1:]
        if ids.size == 0:
            return np.empty((0, *row_shape), dtype)
        lo, hi = int(ids.min()), int(ids.max()) + 1
        if lo < 0 or hi > tensor.n_rows:
            raise IndexError(f"{tensor.name}: row index out of range [0, {tensor.n_rows})")
        mm = self._map(tensor)
        offset, length = tensor.offset + lo * tensor.row_nbytes, (hi - lo) * tensor.row_nbytes
        count = (hi - lo) * math.prod(row_shape)
        view = np.frombuffer(mm, _NUMPY_DTYPES[tensor.dtype], count=count, offset=offset).reshape(hi - lo, *row_shape)
        try:
            # fancy indexing copies; a plain slice is copied by astype: either way nothing points into the map
            out = view[ids - lo].astype(dtype, copy=False) if gather else view.astype(dtype)
        finally:
            del view  # no view may outlive the read: an exported buffer keeps the map from closing
        _release(mm, offset, length)
        return out

    def _map(self, tensor: _Tensor) -> mmap.mmap:
        mm = self._maps.get(tensor.file)
        if mm is None:
            raise ValueError(f"{tensor.name}: the checkpoint is closed")
        return mm

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mm in maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # an array still views the map (held by a traceback); it is unmapped when that is collected

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _check_range(tensor: _Tensor, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= tensor.n_rows:
        raise IndexError(f"{tensor.name}: rows [{start}, {stop}) outside [0, {tensor.n_rows})")
