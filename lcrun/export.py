"""`lcrun convert` and `lcrun quantize` as typed functions: resolve the source, convert, re-quantize atomically."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lcrun.convert.convert import OUTTYPES, ConvertResult, SourceInfo, convert_checkpoint
from lcrun.convert.gguf_out import partial_path

from .atomic_files import atomic_output
from .errors import GGUFFileError, LcrunError

# a phase name ("download", "convert", "quantize") → a progress callback (done, total)
ProgressFactory = Callable[[str], Callable[[int, int], None] | None]


def _no_progress(_phase: str) -> None:
    return None


@dataclass
class ExportResult:
    paths: list[Path]
    outtype: str
    convert: ConvertResult
    source: Path
    quantized_by_llama_cpp: bool = False


def resolve_source(src: str, revision: str | None, progress: ProgressFactory) -> tuple[Path, SourceInfo]:
    """A local checkpoint directory, the built-in `demo`, or a Hub repo id (downloaded into the HF cache)."""
    path = Path(src).expanduser()
    if path.exists():
        return path, SourceInfo()
    if src == "demo":
        from lcrun.models import demo_checkpoint
        return demo_checkpoint(), SourceInfo()
    from . import hub, model_ref
    if not model_ref.looks_like_repo_id(src):
        raise LcrunError(src, "no such file or directory, and not a Hugging Face repo id (org/name)")
    snapshot, commit = hub.download_checkpoint(src, revision, progress=progress("download"))
    return snapshot, SourceInfo(repo_id=src, revision=commit)


def check_not_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise LcrunError(out, "already exists (use --force to overwrite)")


def quantize_file(src: Path, dst: Path, qtype: str, *, force: bool = False, threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Re-quantize a GGUF through llama.cpp's quantizer; `dst` appears only when complete."""
    from .engine import quantize_gguf
    from .gguf_inspect import inspect_gguf

    if src.resolve() == dst.resolve():
        raise LcrunError(dst, "output would overwrite the input")
    inspect_gguf(src)  # a corrupt or truncated input gets a one-line error here, not a crash in llama.cpp
    check_not_existing(dst, force)
    if not dst.parent.is_dir() or not os.access(dst.parent, os.W_OK):
        raise LcrunError(dst.parent, "output directory does not exist or is not writable")
    with atomic_output(dst) as partial:
        quantize_gguf(src, partial, qtype, threads=threads, progress=progress)
    try:
        inspect_gguf(dst)
    except GGUFFileError:
        dst.unlink(missing_ok=True)
        raise
    return dst


def export_model(src: str, out: Path | None, outtype: str = "auto", *, revision: str | None = None,
                 rope_theta: float | None = None, ctx: int | None = None, split_max_size: int = 0,
                 force: bool = False, threads: int | None = None,
                 progress: ProgressFactory = _no_progress) -> ExportResult:
    """`lcrun convert`: our own outtypes directly; llama.cpp's quant types through an intermediate file."""
    from .engine import llama_quant_types

    model_dir, source = resolve_source(src, revision, progress)
    key = outtype.lower()
    if key in OUTTYPES:
        result = convert_checkpoint(model_dir, out, outtype=key, rope_theta=rope_theta, ctx=ctx,
                                    split_max_size=split_max_size, force=force, progress=progress("convert"),
                                    source=source, threads=threads)
        return ExportResult(paths=result.paths, outtype=result.outtype, convert=result, source=model_dir)

    if outtype.upper() not in llama_quant_types():
        raise LcrunError(None, f"unknown --outtype {outtype!r}: use one of {', '.join(OUTTYPES)} "
                               "or a llama.cpp quant type such as Q4_K_M, Q5_K_M, Q6_K, IQ4_XS")
    if split_max_size:
        raise LcrunError(None, "--split-max-size works with the outtypes computed here; for llama.cpp quant types "
                               "quantize first, then split with llama-gguf-split")
    if out is not None:
        check_not_existing(out, force)
    # llama.cpp quantizes best from 16-bit (or f32) weights: keep the source precision for the intermediate; a 4-bit
    # checkpoint's weights are decoded to F16 for it (llama.cpp's quantizer refuses to re-quantize NVFP4, Q4_0, …)
    from lcrun.convert.planning import carries_quantized, plan_checkpoint

    intermediate_type = "f16" if carries_quantized(plan_checkpoint(model_dir)) else "auto"
    intermediate_dir = (out.parent if out is not None else Path.cwd())
    intermediate = intermediate_dir / f".lcrun-intermediate-{os.getpid()}.gguf"
    try:
        result = convert_checkpoint(model_dir, intermediate, outtype=intermediate_type, rope_theta=rope_theta, ctx=ctx,
                                    force=True, progress=progress("convert"), source=source, threads=threads)
        if out is None:
            out = intermediate_dir / f"{result.name_stem}-{outtype.upper()}.gguf"
            check_not_existing(out, force)
        quantize_file(intermediate, out, outtype, force=force, threads=threads, progress=progress("quantize"))
    finally:
        intermediate.unlink(missing_ok=True)
        partial_path(intermediate).unlink(missing_ok=True)
    return ExportResult(paths=[out], outtype=outtype.upper(), convert=result, source=model_dir,
                        quantized_by_llama_cpp=True)

