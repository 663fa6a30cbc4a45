"""Hugging Face checkpoint directory in, GGUF out: `convert_checkpoint(...)` is the library API."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .arch import ModelAdapter, TensorPlan, adapter_for
from .errors import CheckpointError, OutputError, UnsupportedModelError
from .gguf_out import GGUFOutput
from .quants import OWN_QUANTS, Q, can_encode, encode_rows, tensor_nbytes
from .safetensors_io import Checkpoint
from .vocab import add_vocab_to_gguf, load_vocab

ProgressCallback = Callable[[int, int], None]

# the outtypes computed here; llama.cpp's own quant types (Q4_K_M, …) are produced by the application through
# llama.cpp's quantizer from an intermediate file of one of these
OUTTYPES: dict[str, Q | None] = {"auto": None, "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}

_FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
_SOURCE_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}

# bytes of float32 work per chunk: bounds peak memory by a chunk, not by the largest tensor. Small enough that the
# encoder's temporaries are reused from the heap: at 8 MiB glibc mapped each one fresh and faulted it in page by page
# (530K page faults and ~3 s of system time in a q8_0 conversion of the benchmark checkpoint, 46K at 2 MiB)
CHUNK_BYTES = 2 << 20


@dataclass
class SourceInfo:
    repo_id: str | None = None
    revision: str | None = None


@dataclass
class ConvertResult:
    paths: list[Path]
    n_tensors: int
    nbytes: int
    outtype: str
    name_stem: str = ""                      # the GGUF naming convention's name without the encoding part
    tensor_types: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_config(model_dir: Path) -> tuple[dict[str, Any], Path]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(model_dir, "not a directory (expected a Hugging Face checkpoint folder)")
    if not path.is_file():
        raise CheckpointError(model_dir, "no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(path, "must hold a JSON object")
    return config, path


def _auto_type(ckpt: Checkpoint, names: list[str]) -> Q:
    counts = Counter(ckpt.dtype(n) for n in names if len(ckpt.shape(n)) == 2)
    dominant = counts.most_common(1)[0][0] if counts else "F16"
    # FP8 has no GGUF type: bf16 keeps its range, and its 8-bit mantissa holds E4M3/E5M2 values times a scale closely
    return _SOURCE_TYPES.get(dominant, Q.BF16)


def _tensor_type(plan: TensorPlan, outtype: Q) -> Q:
    if plan.keep_f32 or len(plan.shape) == 1:
        return Q.F32
    if outtype in OWN_QUANTS:
        if not can_encode(outtype, plan.shape[-1]):
            return Q.F16  # rows not a whole number of blocks: llama.cpp's converter falls back the same way
        if outtype == Q.Q4_0 and plan.name == "output.weight":
            return Q.Q8_0  # the output projection is the most sensitive tensor; llama.cpp gives it Q6_K, we use Q8_0
    return outtype


def _chunk_rows(plan: TensorPlan) -> int:
    row_elems = int(np.prod(plan.shape[1:])) if len(plan.shape) > 1 else 1
    rows = max(1, CHUNK_BYTES // (4 * row_elems))
    group = plan.rows_per_group
    return max(group, rows // group * group)


def _plans(adapter: ModelAdapter, ckpt: Checkpoint) -> list[TensorPlan]:
    plans: list[TensorPlan] = []
    for name in ckpt.names:
        plan = adapter.plan_tensor(name, ckpt.shape(name), ckpt.file_of(name))
        if plan is not None:
            plans.append(plan)
    have = {p.name for p in plans}
    missing = [n for n in adapter.required_tensors() if n not in have]
    if missing:
        raise CheckpointError(ckpt.model_dir, f"checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. {missing[0]}")
    seen: set[str] = set()
    for plan in plans:
        if plan.name in seen:
            raise CheckpointError(ckpt.model_dir, f"two source tensors map to {plan.name}")
        seen.add(plan.name)
    return plans + adapter.extra_tensors()


def _encode_chunk(ckpt: Checkpoint, plan: TensorPlan, qtype: Q, start: int, stop: int) -> bytes | memoryview:
    if plan.data is not None:
        return encode_rows(plan.data[start:stop], qtype)
    assert plan.source is not None
    if plan.row_index is None and _SOURCE_TYPES.get(ckpt.dtype(plan.source)) == qtype:
        return ckpt.raw_bytes(plan.source, start, stop)  # same precision in and out: copy the bytes
    rows = ckpt.rows(plan.source, start, stop, index=plan.row_index)
    return encode_rows(rows, qtype)


def _jobs(plans: list[TensorPlan], types: list[Q]) -> Iterator[tuple[TensorPlan, Q, int, int]]:
    for plan, qtype in zip(plans, types):
        step = _chunk_rows(plan)
        for start in range(0, plan.shape[0], step):
            yield plan, qtype, start, min(start + step, plan.shape[0])


def convert_checkpoint(
    src: Path,
    out: Path | None = None,
    *,
    outtype: str = "auto",
    rope_theta: float | None = None,
    ctx: int | None = None,
    split_max_size: int = 0,
    force: bool = False,
    progress: ProgressCallback | None = None,
    source: SourceInfo | None = None,
    threads: int | None = None,
) -> ConvertResult:
    """Convert the checkpoint in `src` to GGUF at `out` (splits: `<out stem>-0000N-of-0000M.gguf`).

    Everything is validated before the first byte is written; output is atomic (see gguf_out)."""
    src = Path(src)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise UnsupportedModelError(None, f"outtype {outtype!r} is not computed here (choose from {', '.join(OUTTYPES)})")
    config, config_path = read_config(src)
    adapter = adapter_for(config, config_path)
    warnings: list[str] = []

    original_theta = adapter.rope.theta
    if rope_theta is not None:
        if not (isinstance(rope_theta, (int, float)) and math.isfinite(rope_theta) and rope_theta > 0):
            raise UnsupportedModelError(None, f"--rope-theta must be a finite number > 0, got {rope_theta!r}")
        # llama3's rope_freqs are computed from the theta they will be used with
        adapter.rope = dataclasses.replace(adapter.rope, theta=float(rope_theta))
    context_length = adapter.context_length
    if ctx is not None:
        if ctx <= 0:
            raise UnsupportedModelError(None, f"--ctx must be > 0, got {ctx}")
        context_length = ctx
    if adapter.rope.kind == "yarn" and (adapter.rope.beta_fast, adapter.rope.beta_slow) != (32.0, 1.0):
        warnings.append("yarn beta_fast/beta_slow differ from llama.cpp's defaults; they are stored in the file, "
                        "but llama.cpp's llama architecture does not read them")

    with Checkpoint(src, config.get("quantization_config") or config.get("compression_config")) as ckpt:
        plans = _plans(adapter, ckpt)
        vocab = load_vocab(src, adapter.vocab_size)
        requested = OUTTYPES[outtype]
        base_type = requested if requested is not None else _auto_type(ckpt, ckpt.names)  # Q.F32 is 0: no `or`
        if outtype == "auto":
            outtype = base_type.name.lower()
        types = [_tensor_type(p, base_type) for p in plans]
        n_params = sum(int(np.prod(p.shape)) for p in plans if p.data is None)

        metadata = gguf.Metadata.load(None, src, None, n_params)
        if source and source.repo_id:
            metadata.basename = metadata.basename or source.repo_id.split("/")[-1]
            metadata.source_repo_url = f"https://huggingface.co/{source.repo_id}"
        metadata.name = metadata.name or metadata.basename or src.name
        metadata.size_label = metadata.size_label or gguf.size_label(n_params, n_params, 0, 0)
        stem = gguf.naming_convention(metadata.name, metadata.basename, metadata.finetune, metadata.version,
                                      metadata.size_label, None)
        if out is None:
            out = Path.cwd() / f"{stem}-{outtype.upper()}.gguf"
        out = Path(out)
        if out.suffix != ".gguf":
            raise OutputError(out, "output name must end in .gguf")

        gout = GGUFOutput(out, adapter.arch_name, split_max_size=split_max_size, force=force)
        metadata.set_gguf_meta_model(gout.writer)
        _add_model_metadata(gout.writer, adapter, base_type, context_length, source)
        add_vocab_to_gguf(gout.writer, vocab)
        if rope_theta is not None:
            gout.writer.add_float64("lcrun.override.rope_freq_base_original", original_theta)
        if ctx is not None:
            gout.writer.add_uint64("lcrun.override.context_length_original", adapter.context_length)
        for plan, qtype in zip(plans, types):
            gout.add_tensor(plan.name, plan.shape, qtype, tensor_nbytes(qtype, plan.shape))
        with gout:
            gout.open()
            _stream_tensors(gout, ckpt, plans, types, progress, threads)
            paths = gout.commit()

    mix = Counter(t.name for t in types)
    return ConvertResult(paths=paths, n_tensors=len(plans), nbytes=gout.total_bytes, outtype=outtype, name_stem=stem,
                         tensor_types=dict(mix), warnings=warnings)


def _add_model_metadata(w: gguf.GGUFWriter, adapter: ModelAdapter, base_type: Q, context_length: int,
                        source: SourceInfo | None) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    adapter.add_hparams(w, context_length=context_length, rope_theta=adapter.rope.theta)
    w.add_file_type(_FILE_TYPES[base_type])
    if base_type in OWN_QUANTS:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("lcrun.converter", "lcrun convert")
    if source and source.repo_id:
        w.add_string("lcrun.source.repo", source.repo_id)
    if source and source.revision:
        w.add_string("lcrun.source.revision", source.revision)


def _stream_tensors(gout: GGUFOutput, ckpt: Checkpoint, plans: list[TensorPlan], types: list[Q],
                    progress: ProgressCallback | None, threads: int | None) -> None:
    """Encode row chunks on a small thread pool (numpy releases the GIL) and write them in order; at most
    threads + 1 chunks are in memory at once."""
    total, done = gout.total_bytes, 0
    if progress:
        progress(0, total)
    n_threads = max(1, threads or min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_threads) as pool:
        window: list[Future[bytes | memoryview]] = []
        for job in _jobs(plans, types):
            window.append(pool.submit(_encode_chunk, ckpt, *job))
            if len(window) > n_threads:
                done += _write_next(gout, window)
                if progress:
                    progress(done, total)
        while window:
            done += _write_next(gout, window)
            if progress:
                progress(done, total)


def _write_next(gout: GGUFOutput, window: list[Future[bytes | memoryview]]) -> int:
    data = window.pop(0).result()
    gout.write(data)
    return len(data)

