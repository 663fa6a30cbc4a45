"""The `lcrun` command line: parse, call one core function, render. Errors are caught once, here."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .cli_options import KV_TYPE_HELP, context_option, machine_options
from .param_types import KV_TYPE, SIZE, kv_type_from, worker_memory_map


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line per error, non-zero exit, a traceback only with LCRUN_DEBUG=1."""
    from lcrun.convert.errors import OneLineError

    debug = os.environ.get("LCRUN_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="lcrun", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "lcrun"
        _fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        if debug:
            raise
        _fail("interrupted (nothing half-written is left behind)", 130)
    except OneLineError as exc:
        if debug:
            raise
        _fail(str(exc))
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - the boundary: never a traceback for users
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (run with LCRUN_DEBUG=1 for the traceback)", 2)


class _Commands(click.Group):
    """The commands defined here, and those in modules of their own (found by name: no module imports this one)."""

    elsewhere = {"chat": "lcrun.chat_cli", "niah": "lcrun.niah_cli", "bench": "lcrun.bench_cli",
                 "worker": "lcrun.worker_cli", "serve": "lcrun.serve_cli", "read": "lcrun.read_cli",
                 "plan": "lcrun.plan_cli"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.elsewhere])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.elsewhere:
            import importlib

            return getattr(importlib.import_module(self.elsewhere[name]), name)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lcrun")
def cli() -> None:
    """Run long-context Llama models (Llama 3.1, Gradient 1048K, …) on your own machine."""


@cli.command(epilog="""\b
Examples:
  lcrun convert demo -o tiny.gguf                       # the built-in tiny model, no download
  lcrun convert ./Llama-3.1-8B-Instruct --outtype q8_0
  lcrun convert gradientai/Llama-3-8B-Instruct-Gradient-1048k --outtype Q4_K_M
  lcrun convert ./ckpt --outtype bf16 --split-max-size 4G -o model.gguf
  lcrun convert nvidia/Llama-3.1-8B-Instruct-FP4        # NVFP4 stays NVFP4, bit for bit
  lcrun convert ./Llama-3.1-8B-Instruct-GPTQ-INT4       # int4 -> Q4_0 (symmetric) / Q4_1, not re-quantized
  lcrun convert ./Llama-3.1-8B-Instruct --outtype nvfp4  # quantize to NVFP4 here (ggml's reference quantizer)
""")
@click.argument("src")
@click.option("-o", "--output", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .gguf (default: the GGUF naming convention, in the current directory).")
@click.option("--outtype", default="auto", show_default=True, metavar="TYPE",
              help="auto (keep the source precision; 4-bit checkpoints stay NVFP4/MXFP4/Q4_0/Q4_1), f32, f16, "
                   "bf16, q8_0, q4_0, nvfp4, mxfp4 — computed here — or any llama.cpp quant type (Q4_K_M, Q5_K_M, "
                   "Q6_K, IQ4_XS, …) through llama.cpp's quantizer.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--rope-theta", "--rope-freq-base", "rope_theta", type=float,
              help="Override the RoPE base (recorded in the file's metadata).")
@context_option("Override the context length the file declares, e.g. 1M (recorded in metadata).")
@click.option("--split-max-size", type=SIZE, metavar="SIZE",
              help="Write standard -0000N-of-0000M.gguf splits of at most SIZE (e.g. 4G).")
@click.option("-t", "--threads", type=int,
              help="Worker threads (default: up to 2 for conversion, all cores for llama.cpp quants).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output path(s).")
def convert(src: str, out: Path | None, outtype: str, revision: str | None, rope_theta: float | None,
            ctx: int | None, split_max_size: int | None, threads: int | None, force: bool, quiet: bool) -> None:
    """Convert a Hugging Face checkpoint (a local folder, a Hub repo id, or `demo`) to GGUF.

    Reads safetensors in BF16/F16/F32, FP8 (fbgemm, AutoFP8, compressed-tensors, block-scaled, ModelOpt) and 4-bit
    (ModelOpt NVFP4, compressed-tensors NVFP4/MXFP4/int4/int8, GPTQ, AWQ: kept as they are where GGUF holds them),
    keeps RoPE theta and llama3/linear/yarn scaling exact, and refuses what llama.cpp cannot express.
    """
    from .export import export_model
    from .ui.console import make_console
    from .ui.progress import phase_progress

    console = make_console(stderr=True)
    with phase_progress(console, quiet=quiet) as progress:
        result = export_model(src, out, outtype, revision=revision, rope_theta=rope_theta, ctx=ctx,
                              split_max_size=split_max_size or 0, force=force, threads=threads, progress=progress)
    for warning in result.convert.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    if not quiet:
        mix = ", ".join(f"{n} {t}" for t, n in sorted(result.convert.tensor_types.items()))
        how = "quantized by llama.cpp" if result.quantized_by_llama_cpp else mix
        console.print(f"wrote {len(result.paths)} file(s), {result.convert.n_tensors} tensors ({how})")
    for path in result.paths:
        click.echo(str(path))


@cli.command(epilog="""\b
Examples:
  lcrun quantize model-BF16.gguf model-Q4_K_M.gguf Q4_K_M
  lcrun quantize model-F16.gguf model-IQ4_XS.gguf iq4_xs --threads 8
""")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("qtype", metavar="TYPE")
@click.option("-t", "--threads", type=int, help="Threads for llama.cpp's quantizer (default: all cores).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def quantize(src: Path, dst: Path, qtype: str, threads: int | None, force: bool, quiet: bool) -> None:
    """Re-quantize an existing GGUF with llama.cpp's quantizer (atomic output)."""
    from .export import quantize_file
    from .ui.console import make_console
    from .ui.progress import phase_progress

    console = make_console(stderr=True)
    with phase_progress(console, quiet=quiet) as progress:
        quantize_file(src, dst, qtype, force=force, threads=threads, progress=progress("quantize"))
    click.echo(str(dst))


@cli.command(epilog="""\b
Examples:
  lcrun inspect Llama-3.1-8B-Instruct-Q4_K_M.gguf
  lcrun inspect model-00001-of-00003.gguf --json | jq .rope
""")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Show what a GGUF file holds: architecture, RoPE, tokenizer, tensor types — and what looks wrong."""
    from .gguf_inspect import inspect_gguf

    if str(path) == "demo" and not path.exists():
        from .launch.model_file import demo_gguf

        path = demo_gguf()
    report = inspect_gguf(path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=_json_default))
        return
    from .ui.console import make_console
    from .ui.inspect_view import render_inspect

    render_inspect(report, make_console())


@cli.command(epilog="""\b
Examples:
  lcrun models
  lcrun models --json
""")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def models(as_json: bool) -> None:
    """List the built-in profiles of known long-context models (usable with no network)."""
    from lcrun.models import load_profiles

    from .profiles import describe_profiles

    rows = describe_profiles(load_profiles())
    if as_json:
        from .recall_report import published_json

        click.echo(json.dumps([{"name": p.name, "repo_id": p.repo_id, "aliases": list(p.aliases),
                                "description": p.description, "parameters": n, "rope": rope, "config": p.config,
                                "ruler": published_json(p.ruler, int(p.config["max_position_embeddings"]))
                                if p.ruler else None} for p, n, rope in rows], indent=2))
        return
    from .ui.console import make_console
    from .ui.models_view import render_profiles

    render_profiles(rows, make_console())


@cli.command(epilog="""\b
Examples:
  lcrun estimate gradientai/Llama-3-70B-Instruct-Gradient-1048k --quant Q4_K_M --kv-type q8_0
  lcrun estimate llama-3.1-8b --quant Q8_0 --quant Q4_K_M --ctx 32k --ctx 128k --gpu-mem 24G
  lcrun estimate ./Llama-3.1-8B-Instruct-Q4_K_M.gguf --kv-type f16 --kv-type q4_0 --json
  lcrun estimate meta-llama/Llama-3.1-8B-Instruct --file paper.pdf     # its tokenizer alone is fetched
  lcrun estimate bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M -f ./src --ram 24G
""")
@click.argument("model")
@click.option("-f", "--file", "documents", multiple=True, metavar="DOC",
              help="Count DOC (a file, folder, URL or -: as `lcrun read` reads it) with MODEL's own tokenizer, "
                   "fetched alone (no weights), and say what context and memory it needs and what fits here "
                   "(repeatable; the Hub GGUF is then --hf-file).")
@click.option("--reserve", type=click.IntRange(0), default=1024, show_default=True, metavar="N",
              help="With --file: tokens kept for the answer beside the documents.")
@click.option("--quant", "quants", multiple=True, metavar="TYPE",
              help="Quant type(s) to plan for (repeatable; default Q8_0 and Q4_K_M; a GGUF file has its own).")
@context_option("Context length(s), e.g. 32k, 128k, 1M (repeatable; default: a ladder up to the model's "
                "maximum).", dest="ctxs", multiple=True)
@click.option("--kv-type", "kv_types", type=KV_TYPE, multiple=True, metavar="K[/V]",
              help=f"{KV_TYPE_HELP} (repeatable; default f16).")
@machine_options(file_flag_free=True)
@click.option("--allow-ctx-extension", is_flag=True, help="Allow contexts above the model's maximum.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: the model, devices, every plan and "
              "the largest context that fits per quant and KV type.")
def estimate(model: str, documents: tuple[str, ...], reserve: int, quants: tuple[str, ...], ctxs: tuple[int, ...],
             kv_types: tuple[str, ...], cache_type_k: str | None, cache_type_v: str | None, flash_attn: str,
             ubatch: int, parallel: int, gpu_layers: int | None, gpu_mem: tuple[int, ...], ram: int | None, rpc: list[str] | None,
             rpc_mem: tuple[tuple[str, int], ...], hub_file: str | None, revision: str | None,
             allow_ctx_extension: bool, as_json: bool) -> None:
    """How much memory MODEL needs at each quant, context and KV type — and what fits here — before download.

    MODEL is a Hub repo id (only config.json and safetensors headers are read), a local checkpoint folder, a local
    GGUF (splits included), or a built-in profile (`lcrun models`).
    """
    from .devices import run_devices
    from .errors import LcrunError
    from .estimate import context_ladder, estimate_grid
    from .memory_model import parse_kv_type
    from .model_spec import resolve_model

    if documents:  # read first: a document that cannot be read fails before anything is fetched
        from .documents import read_documents

        read = read_documents(list(documents))
    spec = resolve_model(model, revision=revision, gguf_file=hub_file)
    contexts = [c for c in ctxs if c is not None] or context_ladder(spec.n_ctx_train)
    too_long = [c for c in contexts if c > spec.n_ctx_train]
    if too_long and not allow_ctx_extension:
        raise LcrunError(model, f"context {too_long[0]:,} is above the model's maximum of {spec.n_ctx_train:,} "
                                "(pass --allow-ctx-extension if you extend it with RoPE overrides)")
    if spec.file_tensor_bytes is not None:
        if quants:
            raise LcrunError(model, f"this model has its own quantization ({spec.file_type}); drop --quant")
        quants = (spec.file_type or "file",)
    quants = quants or ("Q8_0", "Q4_K_M")
    ll_kv = kv_type_from(None, cache_type_k, cache_type_v)
    if ll_kv and kv_types:
        raise click.UsageError("give the KV cache types once: --kv-type K[/V], or -ctk/-ctv")
    given_kv = [k for k in kv_types if k]
    kv_pairs = [parse_kv_type(k) for k in ((ll_kv,) if ll_kv else given_kv or ["f16"])]
    devices = run_devices(gpu_mem, ram, rpc or (), worker_memory_map(rpc_mem))
    if documents:
        _estimate_documents(model, spec, read, quants, kv_pairs if (ll_kv or given_kv) else None, devices,
                            reserve=reserve, revision=revision, hub_file=hub_file, flash_attn=flash_attn != "off",
                            n_ubatch=ubatch, n_seq=parallel, n_gpu_layers=gpu_layers, as_json=as_json)
        return
    try:
        estimates, largest = estimate_grid(spec, quants, contexts, kv_pairs, devices, flash_attn=flash_attn != "off",
                                       n_ubatch=ubatch, n_seq=parallel, n_gpu_layers=gpu_layers,
                                       max_ctx=max(spec.n_ctx_train, *contexts))
    except ValueError as exc:
        raise LcrunError(model, str(exc)) from exc
    from .recall_report import estimate_recall

    recall, advice = estimate_recall(model, spec, devices, quants, largest, flash_attn=flash_attn != "off",
                                     n_ubatch=ubatch, n_seq=parallel, n_gpu_layers=gpu_layers)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps({
            "model": spec.name, "source": spec.source, "notes": spec.notes,
            "devices": [asdict(d) for d in devices],
            "plans": [estimate.to_dict() for estimate in estimates],  # the JSON key predates the rename
            "largest_fitting_context": [{"quant": q, "kv_type": kv, "ctx": n} for (q, kv), n in largest.items()],
            "recall": recall,   # RULER's published figures; measured ones and their advice for a local GGUF
        }, indent=2))
        return
    from .ui.console import make_console
    from .ui.estimate_view import render_estimate

    render_estimate(spec.name, "; ".join(spec.notes) or spec.source, devices, estimates, largest, make_console(),
                    recall=advice)


def _estimate_documents(model: str, spec: Any, documents: list[Any], quants: tuple[str, ...],
                        kv_pairs: list[tuple[str, str]] | None, devices: list[Any], *, as_json: bool,
                        **options: Any) -> None:
    from .estimate_documents import estimate_documents

    result = estimate_documents(model, spec, documents, quants, devices, kv_pairs=kv_pairs, **options)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps({"model": spec.name, "source": spec.source, "notes": spec.notes,
                               "devices": [asdict(d) for d in devices], **result.to_dict()}, indent=2))
        return
    from .ui.console import make_console
    from .ui.estimate_view import render_document_estimate

    render_document_estimate(spec.name, "; ".join(spec.notes) or spec.source, devices, result, make_console())



def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    main()
