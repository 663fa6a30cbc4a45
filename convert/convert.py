"""Hugging Face checkpoint directory in, GGUF out: `convert_checkpoint(...)` is the library API."""
from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .arch import ModelAdapter, TensorPlan, adapter_for
from .errors import OutputError, UnsupportedModelError
from .fp4 import power_of_two_prescale
from .gguf_out import GGUFOutput
from .planning import OUTTYPES, GGUFPlan, plan_gguf, read_config
from .quant_config import load_quantization_config
from .quants import Q, encode_rows, tensor_nbytes
from .safetensors_io import Checkpoint
from .vocab import add_vocab_to_gguf, load_vocab

ProgressCallback = Callable[[int, int], None]

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
    origins: dict[str, str] = field(default_factory=dict)   # GGUF tensor -> where it came from (non-plain only)


def _chunk_rows(plan: TensorPlan) -> int:
    row_elems = int(np.prod(plan.shape[1:])) if len(plan.shape) > 1 else 1
    rows = max(1, CHUNK_BYTES // (4 * row_elems))
    group = plan.rows_per_group
    return max(group, rows // group * group)


class _Prescales:
    """Per tensor encoded as NVFP4 from floats: the power of two its values are multiplied by first (ggml's NVFP4
    quantizer has no per-tensor scale, and small weights would get subnormal E4M3 scales), found from the whole
    tensor's largest |value| when its first chunk is encoded; `<weight>.scale` gets the inverse."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.values: dict[str, float] = {}
        self.lock = threading.Lock()

    def of(self, plan: TensorPlan) -> float:
        with self.lock:
            if plan.name not in self.values:
                amax = 0.0
                step = _chunk_rows(plan)
                for start in range(0, plan.shape[0], step):
                    rows = _source_rows(self.ckpt, plan, start, min(start + step, plan.shape[0]))
                    amax = max(amax, float(np.nanmax(np.abs(rows))) if rows.size else 0.0)
                self.values[plan.name] = power_of_two_prescale(amax)
            return self.values[plan.name]


def _source_rows(ckpt: Checkpoint, plan: TensorPlan, start: int, stop: int) -> np.ndarray:
    if plan.data is not None:
        return plan.data[start:stop]
    assert plan.source is not None
    return ckpt.rows(plan.source, start, stop, index=plan.row_index)


def _encode_chunk(ckpt: Checkpoint, plan: TensorPlan, qtype: Q, start: int, stop: int,
                  prescales: _Prescales) -> bytes | memoryview:
    if plan.data is not None:
        return encode_rows(plan.data[start:stop], qtype)
    assert plan.source is not None
    src = ckpt.quantized(plan.source)
    if src is not None and src.exact_type() == qtype:
        return ckpt.blocks(plan.source, qtype, start, stop, index=plan.row_index)  # the stored values, repacked
    if src is None and plan.row_index is None and _SOURCE_TYPES.get(ckpt.dtype(plan.source)) == qtype:
        return ckpt.raw_bytes(plan.source, start, stop)  # same precision in and out: copy the bytes
    rows = ckpt.rows(plan.source, start, stop, index=plan.row_index)
    if qtype == Q.NVFP4:
        rows = rows.astype(np.float32) * np.float32(prescales.of(plan))  # a power of two: exact
    return encode_rows(rows, qtype)


def _fill_factors(ckpt: Checkpoint, gplan: GGUFPlan, prescales: _Prescales) -> None:
    """The data of every NVFP4 weight's `<weight>.scale`: the checkpoint's per-tensor factor, or 1 / the prescale."""
    by_name = {p.name: p for p in gplan.plans}
    for name, source in gplan.factors.items():
        factor = ckpt.tensor_factor(source)
        if factor is None:
            weight = by_name[name.removesuffix(".scale") + ".weight"]
            factor = 1.0 / prescales.of(weight)
        data = by_name[name].data
        assert data is not None
        data[0] = np.float32(factor)


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

    with Checkpoint(src, load_quantization_config(src, config)) as ckpt:
        gplan = plan_gguf(adapter, ckpt, outtype)
        plans, types, outtype = gplan.plans, gplan.types, gplan.outtype
        vocab = load_vocab(src, adapter.vocab_size)
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

        prescales = _Prescales(ckpt)
        _fill_factors(ckpt, gplan, prescales)
        gout = GGUFOutput(out, adapter.arch_name, split_max_size=split_max_size, force=force)
        metadata.set_gguf_meta_model(gout.writer)
        _add_model_metadata(gout.writer, adapter, gplan, context_length, source, ckpt)
        add_vocab_to_gguf(gout.writer, vocab)
        if rope_theta is not None:
            gout.writer.add_float64("lcrun.override.rope_freq_base_original", original_theta)
        if ctx is not None:
            gout.writer.add_uint64("lcrun.override.context_length_original", adapter.context_length)
        for plan, qtype in zip(plans, types):
            gout.add_tensor(plan.name, plan.shape, qtype, tensor_nbytes(qtype, plan.shape))
        with gout:
            gout.open()
            _stream_tensors(gout, ckpt, plans, types, progress, threads, prescales)
            paths = gout.commit()
        warnings += _rounding_notes(ckpt, gplan)

    mix = Counter(t.name for t in types)
    return ConvertResult(paths=paths, n_tensors=len(plans), nbytes=gout.total_bytes, outtype=outtype, name_stem=stem,
                         tensor_types=dict(mix), warnings=warnings, origins=dict(gplan.origins))


def _rounding_notes(ckpt: Checkpoint, gplan: GGUFPlan) -> list[str]:
    """What was not carried exactly: scales F16 could not hold, and quantized weights no GGUF type holds."""
    notes = []
    if ckpt.rounding.tensors:
        notes.append(f"{len(ckpt.rounding.tensors)} tensor(s) carried as Q4_0/Q4_1/Q8_0 have scales F16 cannot hold "
                     f"exactly (F32 scales, or Q4_1's −zero·scale); rounded to F16, largest relative change "
                     f"{ckpt.rounding.worst:.2g}")
    decoded = Counter(origin for origin in gplan.origins.values() if "decoded to" in origin and " F8_" not in origin)
    for origin, n in decoded.items():
        notes.append(f"{n} tensor(s) {origin}: no GGUF type holds them exactly")
    return notes


def _add_model_metadata(w: gguf.GGUFWriter, adapter: ModelAdapter, gplan: GGUFPlan, context_length: int,
                        source: SourceInfo | None, ckpt: Checkpoint) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    adapter.add_hparams(w, context_length=context_length, rope_theta=adapter.rope.theta)
    w.add_file_type(gplan.file_type)
    if gplan.quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("lcrun.converter", "lcrun convert")
    if source and source.repo_id:
        w.add_string("lcrun.source.repo", source.repo_id)
    if source and source.revision:
        w.add_string("lcrun.source.revision", source.revision)
    if ckpt.quant is not None:
        w.add_string("lcrun.source.quantization", ckpt.quant.label)
    if gplan.origins:
        # where each tensor came from, for `lcrun inspect`: parallel arrays, as llama.cpp's tensor_extra keys are
        w.add_array("lcrun.tensor_origin.name", list(gplan.origins))
        w.add_array("lcrun.tensor_origin.value", list(gplan.origins.values()))
    if ckpt.quant is not None and ckpt.quant.w4a16:
        # ModelOpt W4A16_NVFP4: the weights were calibrated for 16-bit activations, so no backend may round them to
        # 4 bits (llama.cpp's per-tensor precision policy; the CPU rounds them to Q8_0 regardless)
        nvfp4 = sorted(p.name for p, t in zip(gplan.plans, gplan.types) if t == Q.NVFP4)
        w.add_array(gguf.Keys.General.TENSOR_EXTRA_NAME if hasattr(gguf.Keys.General, "TENSOR_EXTRA_NAME")
                    else "general.tensor_extra.name", nvfp4)
        w.add_array("general.tensor_extra.prec_a4", [False] * len(nvfp4))


def _stream_tensors(gout: GGUFOutput, ckpt: Checkpoint, plans: list[TensorPlan], types: list[Q],
                    progress: ProgressCallback | None, threads: int | None, prescales: _Prescales) -> None:
    """Encode row chunks on a small thread pool (numpy releases the GIL) and write them in order; at most
    threads + 1 chunks are in memory at once."""
    total, done = gout.total_bytes, 0
    if progress:
        progress(0, total)
    n_threads = max(1, threads or min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_threads) as pool:
        window: list[Future[bytes | memoryview]] = []
        for job in _jobs(plans, types):
            window.append(pool.submit(_encode_chunk, ckpt, *job, prescales))
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

