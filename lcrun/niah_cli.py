"""`lcrun niah`: parse, decide the launch, open the model, run the grid into the results log, then show and save the
heatmap. The click callback only parses; `_run` strings the launch, the core (lcrun.niah) and the view
(lcrun.ui.niah_view) together."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli_options import chat_format_options, launch_options

if TYPE_CHECKING:
    from .launch.options import LaunchOptions
    from .niah.run import NiahParams

_PLAN_ROOM = 256  # tokens planned beyond --max-ctx for the template, question and answer (measured after loading)


def _ctx_value(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    from .param_types import parse_ctx

    return parse_ctx(value) if value is not None else None


@click.command(epilog="""\b
Examples:
  lcrun niah demo --max-ctx 1800 --ctx-steps 4                 # the tiny built-in model: plumbing, scores 0
  lcrun niah model.gguf --max-ctx 128k --ctx-steps 8 --svg niah.svg
  lcrun niah model.gguf --max-ctx 64k --kv-type f16  -o f16.jsonl
  lcrun niah model.gguf --max-ctx 64k --kv-type q4_0 -o q4_0.jsonl   # same needles: compare the two
  lcrun niah model.gguf --max-ctx 64k -o run.jsonl --resume          # after an interruption
  lcrun niah model.gguf --max-ctx 32k --chat-template chatml         # a llama.cpp format instead of the file's
  lcrun niah base-model.gguf --max-ctx 16k --raw                     # a base model: a sentence to complete
  lcrun niah model.gguf --max-ctx 64k --haystack contract.pdf        # your own document as the haystack
\b
The RULER-style suite (six tasks; effective context per KV type, stored for plan/chat/serve):
  lcrun niah model.gguf --suite ruler                                # 4K, 8K, … up to the planned context
  lcrun niah model.gguf --suite ruler --max-ctx 32k --kv-type f16 --kv-type q8_0 --kv-type q4_0
  lcrun niah model.gguf --suite ruler --lengths 4k,8k --kv-type q8_0/q4_0 --samples 2 --json
  lcrun niah model.gguf --suite ruler --tasks single,vt,cwe --max-ctx 16k
  lcrun niah model.gguf --suite ruler --max-ctx 32k --resume         # after an interruption
""")
@click.argument("model")
@launch_options(kv_types=True)
@chat_format_options
@click.option("--suite", type=click.Choice(["needle", "ruler"]), default="needle", show_default=True,
              help="needle: one needle per cell, a depth × length heatmap (Gradient's picture). ruler: six RULER "
                   "tasks (single needle, multi-key, multi-value, multi-query, variable tracking, common words) per "
                   "length and KV type, and the effective context, stored for plan, chat and serve.")
@click.option("--min-ctx", metavar="N", callback=_ctx_value,
              help="Shortest context in tokens (default: 100; ruler: 4k, RULER's shortest).")
@click.option("--max-ctx", metavar="N", callback=_ctx_value,
              help="Longest context (default: 1140200, Gradient's, capped to the planned context less the room the "
                   "question and answer need; ruler: the planned context, at most the model's maximum).")
@click.option("--lengths", metavar="N,N,…", help="ruler: these lengths (e.g. 4k,8k,16k) instead of the ladder "
                                                 "4K, 8K, 16K, … up to --max-ctx.")
@click.option("--tasks", metavar="TASK,…", help="ruler: only these tasks (single, multikey, multivalue, multiquery, "
                                                "vt, cwe; default all six).")
@click.option("--ctx-interval", metavar="N", callback=_ctx_value,
              help="needle: contexts min, min+N, … and max (default 86675, Gradient's).")
@click.option("--ctx-steps", type=int, metavar="N", help="needle: instead, N contexts evenly spaced from min to max.")
@click.option("--depth-interval", type=float, default=0.2, show_default=True,
              help="needle: depths 0.0, step, … 1.0 (0.0 = the document's start, 1.0 = its end).")
@click.option("--samples", type=int, metavar="N",
              help="Needles per (context, depth) (default 1); ruler: documents per length and task (default 4).")
@click.option("--digits", type=int, default=8, show_default=True, help="needle: digits of the number to find.")
@click.option("-s", "--seed", type=int, default=0, show_default=True,
              help="Seed of what is hidden: the same seed hides the same needles (for every KV type and model).")
@click.option("--haystack", "haystack_file", metavar="FILE|DIR|URL|-",
              help="The document to hide the needle in, read as `lcrun read` and `chat -f` read it: text, PDF, HTML, "
                   "DOCX, EPUB, a folder, a URL or - (default: the essays lcrun ships; repeated when too short).")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="PATH.jsonl",
              help="Results log, one line per cell (default: niah-<model>-<kv>.jsonl here; ruler: in the user data "
                   "dir, keyed by the model file's fingerprint); the summary goes beside it (.summary.json).")
@click.option("--resume", is_flag=True, help="Continue the run in --output: finished cells are not redone.")
@click.option("--force", is_flag=True, help="Start over, replacing an existing results log.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary on stdout (the heatmap on stderr).")
@click.option("--svg", type=click.Path(dir_okay=False, path_type=Path), help="Save the heatmap as SVG.")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path), help="Save the heatmap as HTML.")
def niah(launch: LaunchOptions, kv_types: tuple[str, ...], suite: str, min_ctx: int | None, max_ctx: int | None,
         lengths: str | None, tasks: str | None, ctx_interval: int | None, ctx_steps: int | None,
         depth_interval: float, samples: int | None, digits: int, seed: int, haystack_file: str | None,
         output: Path | None, resume: bool, force: bool, as_json: bool, svg: Path | None,
         html: Path | None) -> None:
    """Needle in a haystack on MODEL (a GGUF file, `demo`, or a Hub GGUF repo as org/repo[:QUANT]): can it find a number
    hidden at each depth of each context length? With --suite ruler, RULER's harder questions (docs/ruler.md).

    Each cell cuts the haystack to the context length in the model's own tokens, puts a sentence with a random
    number at a sentence boundary near the depth, asks for the number in the model's chat format (--raw: ends the
    prompt with a sentence to complete) and scores the greedy answer 1 if it holds the number. The planner sizes
    the engine; --kv-type and the other options force it.
    """
    from .niah.grid import GRADIENT_MAX_CTX
    from .niah.run import NiahParams

    if resume and force:
        raise click.UsageError("--resume and --force exclude each other: continue the run, or start it over")
    given = click.get_current_context().get_parameter_source
    if suite == "ruler":
        from click.core import ParameterSource

        for name in ("ctx_interval", "ctx_steps", "depth_interval", "digits", "svg", "html"):
            if given(name) not in (ParameterSource.DEFAULT, None):
                raise click.UsageError(f"--{name.replace('_', '-')} is for --suite needle")
        from .niah_ruler_cli import run_ruler

        code = run_ruler(launch, kv_types, min_ctx=min_ctx, max_ctx=max_ctx, lengths=lengths, tasks=tasks,
                         samples=samples, seed=seed, haystack_file=haystack_file, output=output, resume=resume,
                         force=force, as_json=as_json)
        if code:
            sys.exit(code)
        return
    if len(kv_types) > 1:
        raise click.UsageError("one --kv-type per needle run (-o apart); --suite ruler takes several")
    for flag, value in (("--lengths", lengths), ("--tasks", tasks)):
        if value is not None:
            raise click.UsageError(f"{flag} is for --suite ruler")
    params = NiahParams(min_ctx=100 if min_ctx is None else min_ctx, max_ctx=max_ctx or GRADIENT_MAX_CTX,
                        ctx_interval=ctx_interval, ctx_steps=ctx_steps, depth_interval=depth_interval,
                        samples=1 if samples is None else samples, digits=digits, seed=seed)
    code = _run(launch, params, haystack_file, output, resume=resume, force=force, as_json=as_json, svg=svg,
                html=html)
    if code:
        sys.exit(code)


def _run(options: LaunchOptions, params: NiahParams, haystack_file: str | None, output: Path | None, *,
         resume: bool, force: bool, as_json: bool, svg: Path | None, html: Path | None) -> int:
    from .launch.decide import decide_launch, no_larger_than_needed
    from .launch.loaded import open_model
    from .memory_model import kv_type_name
    from .niah.haystack import read_haystack
    from .niah.results import ResultsLog
    from .niah.run import prepare_run, run_cells, run_identity
    from .niah.summary import summarize, summary_path, write_summary
    from .ui.console import make_console
    from .ui.launch_view import render_launch
    from .ui.model_loading import download_progress, loading_status
    from .ui.niah_view import NiahProgress, export_picture, render_heatmap

    out, err = make_console(), make_console(stderr=True)
    params.check()
    haystack = read_haystack(haystack_file)
    with download_progress(err) as download:
        launch = no_larger_than_needed(decide_launch(options, download=download), params.max_ctx + _PLAN_ROOM)
    path, chat_format, estimate = launch.model_path, launch.chat_format, launch.choice.estimate
    settings = {"type_k": estimate.type_k, "type_v": estimate.type_v, "flash_attn": estimate.flash_attn,
                "rope_theta": options.rope_theta, "rope_scale": options.rope_scale,
                "chat_format": chat_format.key if chat_format is not None else None}
    kv = kv_type_name(estimate.type_k, estimate.type_v, separator="-")
    output = output or Path(f"niah-{path.stem}-{kv}.jsonl")
    log = ResultsLog(output, run_identity(path, haystack, params, settings), resume=resume, force=force)
    render_launch(launch, err)

    try:
        with open_model(launch, loading=loading_status(err)) as model:
            engine = model.engine
            niah_run = prepare_run(engine, params, haystack, chat_format)
            for note in niah_run.notes:
                err.print(f"note: {note}", highlight=False, markup=False)
            with log, NiahProgress(err) as bar:
                for event in run_cells(engine, niah_run, log):
                    bar.update(event)
    except KeyboardInterrupt:
        click.echo(f"error: interrupted; {len(log.done)} finished cells are in {output} (continue with --resume)",
                   err=True)
        return 130

    summary = summarize(niah_run, log.done, model=path.name, results=output,
                        settings={**settings, "n_gpu_layers": estimate.n_gpu_layers})
    write_summary(summary, summary_path(output))
    render_heatmap(summary, err if as_json else out)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    export_picture(summary, svg=svg, html=html)
    return 0
