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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from . import fp8
from .errors import CheckpointError, UnsupportedModelError
from .fp8 import Fp8Scheme, detect_fp8_scheme

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


@dataclass(frozen=True)
class _Fp8Binding:
    scale: _Tensor
    zero_point: _Tensor | None
    layout: str            # "tensor", "row" or "block" (fp8.scale_layout)
    block: tuple[int, int]


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
    points are consumed by `rows`, activation scales dropped."""

    def __init__(self, model_dir: Path, quantization_config: dict[str, Any] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.scheme: Fp8Scheme | None = detect_fp8_scheme(quantization_config, self.model_dir / "config.json")
        self._maps: dict[Path, mmap.mmap] = {}
        self._tensors: dict[str, _Tensor] = {}
        self._fp8: dict[str, _Fp8Binding] = {}
        self.names: list[str] = []
        try:
            self._load()
            self.names = [n for n in self._tensors if not fp8.is_auxiliary(n)]
            for name in self.names:
                tensor = self._tensors[name]
                if tensor.dtype not in WEIGHT_DTYPES:
                    raise UnsupportedModelError(tensor.file, f"tensor {name} has dtype {tensor.dtype}; "
                                                             f"weights must be one of {', '.join(WEIGHT_DTYPES)}")
                if tensor.dtype in fp8.FP8_DTYPES:
                    self._fp8[name] = self._bind_fp8(tensor)
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

    def _bind_fp8(self, weight: _Tensor) -> _Fp8Binding:
        candidates = fp8.scale_candidates(weight.name, self.scheme)
        scale = next((self._tensors[c] for c in candidates if c in self._tensors), None)
        if scale is None:
            raise CheckpointError(weight.file, f"FP8 tensor {weight.name} has no {candidates[0].rsplit('.', 1)[-1]} "
                                               f"(nor {candidates[1].rsplit('.', 1)[-1]}) to decode it with")
        if scale.dtype not in fp8.SCALE_DTYPES:
            raise UnsupportedModelError(scale.file, f"FP8 scale {scale.name} has dtype {scale.dtype}; "
                                                    f"scales must be one of {', '.join(fp8.SCALE_DTYPES)}")
        block = self.scheme.block_size if self.scheme else fp8.DEFAULT_BLOCK
        layout = fp8.scale_layout(scale.shape, weight.shape, block)
        if layout is None:
            raise CheckpointError(scale.file, f"FP8 scale {scale.name} of shape {list(scale.shape)} fits neither "
                                              f"per-tensor, per-row nor {block[0]}x{block[1]} blocks of "
                                              f"{weight.name} {list(weight.shape)}")
        zero_point = self._tensors.get(fp8.zero_point_name(weight.name))
        if zero_point is not None:
            if zero_point.dtype not in fp8.ZERO_POINT_DTYPES:
                raise UnsupportedModelError(zero_point.file, f"FP8 zero point {zero_point.name} has dtype "
                                                             f"{zero_point.dtype}")
            if zero_point.shape != scale.shape:
                raise CheckpointError(zero_point.file, f"FP8 zero point {zero_point.name} has shape "
                                                       f"{list(zero_point.shape)}, its scale {list(scale.shape)}")
        return _Fp8Binding(scale, zero_point, layout, block)

    # ---- queries -------------------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> str:
        return self._tensors[name].dtype

    def is_fp8(self, name: str) -> bool:
        return self._tensors[name].dtype in fp8.FP8_DTYPES

    def nbytes(self, name: str) -> int:
        return self._tensors[name].nbytes

    def file_of(self, name: str) -> Path:
        return self._tensors[name].file

    # ---- data ----------------------------------------------------------------------------------------------------
    def rows(self, name: str, start: int, stop: int, index: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) along axis 0 — with `index`, the source rows index[start:stop] — as a fresh array in the
        source dtype; FP8 weights come back decoded to float32."""
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
