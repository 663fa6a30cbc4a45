"""A lazy, validating reader of a checkpoint's (sharded) safetensors files.

Every header is parsed and checked before anything is converted: a truncated file, offsets past the end, a shard the
index names but that is missing, an unsupported dtype — each is one error naming the file. Data is read through
`mmap`; the pages of each chunk are released after it is copied out, so resident memory stays at a chunk, not the model.
"""
from __future__ import annotations

import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .errors import CheckpointError, UnsupportedModelError
from .fp8 import Fp8Scheme, dequantize_rows, detect_fp8_scheme, is_auxiliary

WEIGHT_DTYPES: dict[str, Any] = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
# scale and zero-point tensors may also be integers
AUXILIARY_DTYPES: dict[str, Any] = {**WEIGHT_DTYPES, "I8": np.int8, "U8": np.uint8, "I32": np.int32, "I64": np.int64}
FP8_CODES = ("F8_E4M3", "F8_E5M2")
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class _Entry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int   # absolute offset of the data in the file
    nbytes: int


class _Shard:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    @property
    def map(self) -> mmap.mmap:
        if self._map is None:
            with self._lock:
                if self._map is None:
                    with open(self.path, "rb") as f:
                        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of [start, stop) from this process (they stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = start // _PAGE * _PAGE
        hi = min(-(-stop // _PAGE) * _PAGE, len(self._map))
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header, data start, file size) of one safetensors file, or CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"only {size} bytes: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(path, f"header length {n} runs past the end of the file ({size} bytes): "
                                            "truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")
    return header, 8 + n, size


def _entries(path: Path) -> list[_Entry]:
    header, data_start, size = _read_header(path)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(begin, int) or not isinstance(end, int):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"tensor {name}: malformed header entry {info!r}") from None
        table = AUXILIARY_DTYPES if is_auxiliary(name) else WEIGHT_DTYPES
        if dtype not in table:
            raise UnsupportedModelError(
                path, f"tensor {name} has dtype {dtype}; supported: {', '.join(WEIGHT_DTYPES)}")
        if not 0 <= begin <= end or data_start + end > size:
            raise CheckpointError(path, f"tensor {name}: data offsets [{begin}, {end}] run past the end of the file "
                                        f"({size - data_start} data bytes): truncated?")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(table[dtype]).itemsize
        if end - begin != expected:
            raise CheckpointError(path, f"tensor {name}: {end - begin} bytes of data for shape {list(shape)} "
                                        f"of {dtype} ({expected} expected)")
        entries.append(_Entry(name, path, dtype, shape, data_start + begin, end - begin))
    return entries


class Checkpoint:
    def __init__(self, model_dir: Path, quantization_config: dict[str, Any] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.scheme: Fp8Scheme | None = detect_fp8_scheme(quantization_config, self.model_dir / "config.json")
        self._entries: dict[str, _Entry] = {}
        self._shards: dict[Path, _Shard] = {}
        self._aux_cache: dict[str, np.ndarray] = {}
        files, index_map, index_path = self._shard_files()
        for path in files:
            self._shards[path] = _Shard(path)
            for entry in _entries(path):
                if entry.name in self._entries:
                    raise CheckpointError(path, f"tensor {entry.name} is also in {self._entries[entry.name].file.name}")
                self._entries[entry.name] = entry
        for name, filename in index_map.items():
            entry = self._entries.get(name)
            if entry is None or entry.file.name != filename:
                raise CheckpointError(index_path, f"says tensor {name} is in {filename}, but it is not there")
        self.names = [n for n in self._entries if not is_auxiliary(n)]
        for name in self.names:
            if self.is_fp8(name) and self._scale_name(name) is None:
                raise CheckpointError(self._entries[name].file, f"FP8 tensor {name} has no weight_scale or weight_scale_inv")

    def _shard_files(self) -> tuple[list[Path], dict[str, str], Path]:
        index_path = self.model_dir / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(index_path, "not a valid safetensors index (no 'weight_map' object)") from None
            files = []
            for filename in dict.fromkeys(weight_map.values()):
                path = self.model_dir / str(filename)
                if not path.is_file():
                    raise CheckpointError(index_path, f"names shard {filename}, which is missing")
                files.append(path)
            return files, weight_map, index_path
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            other = [p.name for p in self.model_dir.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".gguf")]
            hint = f" (found {other[0]}: only safetensors checkpoints are supported)" if other else ""
            raise CheckpointError(self.model_dir, f"no *.safetensors weights{hint}")
        return files, {}, index_path

    # ---- queries -------------------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        return self._entries[name].dtype

    def nbytes(self, name: str) -> int:
        return self._entries[name].nbytes

    def file_of(self, name: str) -> Path:
        return self._entries[name].file

    def is_fp8(self, name: str) -> bool:
        return self._entries[name].dtype in FP8_CODES

    def _scale_name(self, name: str) -> str | None:
        base = name.removesuffix("weight")
        for candidate in (base + "weight_scale", base + "weight_scale_inv"):
            if candidate in self._entries:
                return candidate
        return None

    # ---- data ----------------------------------------------------------------------------------------------------
    def _view(self, entry: _Entry, table: dict[str, Any] = WEIGHT_DTYPES) -> np.ndarray:
        shard = self._shards[entry.file]
        dtype = np.dtype(table[entry.dtype])
        flat = np.frombuffer(shard.map, dtype=dtype, count=entry.nbytes // dtype.itemsize, offset=entry.start)
        return flat.reshape(entry.shape if entry.shape else ())

    def _row_bytes(self, entry: _Entry) -> int:
        return entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else entry.nbytes

    def rows(self, name: str, start: int, stop: int, index: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) along axis 0 (with `index`: source rows index[start:stop]); FP8 comes back as float32."""
        entry = self._entries[name]
        view = self._view(entry)
        picked = np.arange(start, stop) if index is None else np.asarray(index[start:stop])
        out = np.array(view[start:stop] if index is None else view[picked], copy=True)
        row_bytes = self._row_bytes(entry)
        lo, hi = (start, stop) if index is None else (int(picked.min()), int(picked.max()) + 1)
        self._shards[entry.file].release(entry.start + lo * row_bytes, entry.start + hi * row_bytes)
        if entry.dtype in FP8_CODES:
            out = self._dequantize(name, entry, out, picked)
        return out

    def raw_bytes(self, name: str, start: int, stop: int) -> bytes:
        entry = self._entries[name]
        row_bytes = self._row_bytes(entry)
        a, b = entry.start + start * row_bytes, entry.start + stop * row_bytes
        shard = self._shards[entry.file]
        data = shard.map[a:b]
        shard.release(a, b)
        return data

    def _aux(self, name: str) -> np.ndarray:
        if name not in self._aux_cache:
            entry = self._entries[name]
            self._aux_cache[name] = np.array(self._view(entry, AUXILIARY_DTYPES), dtype=np.float32, copy=True)
        return self._aux_cache[name]

    def _dequantize(self, name: str, entry: _Entry, rows: np.ndarray, picked: np.ndarray) -> np.ndarray:
        scale_name = self._scale_name(name)
        assert scale_name is not None
        zp_name = name.removesuffix("weight") + "weight_zero_point"
        zero_point = self._aux(zp_name) if zp_name in self._entries else None
        n_rows = entry.shape[0]
        n_cols = entry.shape[1] if len(entry.shape) > 1 else 1
        scheme = self.scheme or Fp8Scheme("per_tensor")
        return dequantize_rows(rows, picked, n_cols, self._aux(scale_name), zero_point, scheme, n_rows,
                               str(entry.file))

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
