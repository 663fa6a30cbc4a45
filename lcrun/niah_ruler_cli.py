"""`lcrun niah MODEL --suite ruler`: decide the launch (its planned context tops the ladder of lengths), plan each KV
type at the longest length, build the suite's prompts with the file's own tokenizer, run the grid through the launch
and the decode loop into the results log, then show the heatmaps and store the effective context per KV type under
the file's fingerprint, where plan, chat and serve read it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from .launch.decide import Launch
    from .launch.options import LaunchOptions
    from .niah.ruler.run import SuiteParams


def _lengths(text: str) -> tuple[int, ...]:
    from .param_types import parse_ctx

    try:
        values = sorted({parse_ctx(part) for part in text.split(",") if part.strip()})
    except click.BadParameter as bad:
        raise click.BadParameter(bad.message, param_hint="--lengths") from None
    if not values or values[0] < 1:
        raise click.BadParameter(f"{text!r} gives no length above 0", param_hint="--lengths")
    return tuple(values)


def _tasks(text: str | None) -> tuple[str, ...]:
    from .niah.ruler.tasks import TASKS

    if text is None:
        return TASKS
    asked = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [t for t in asked if t not in TASKS]
    if unknown or not asked:
        raise click.BadParameter(f"{(unknown or [text])[0]!r} is not a task; the tasks are {', '.join(TASKS)}",
                                 param_hint="--tasks")
    return tuple(t for t in TASKS if t in asked)


def suite_params(launch: Launch, kv_types: tuple[str, ...], *, min_ctx: int | None, max_ctx: int | None,
                 lengths: str | None, tasks: str | None, samples: int | None, seed: int) -> SuiteParams:
    """The grid: the lengths given, else RULER's ladder (4K, 8K, …) up to --max-ctx or the planned context (at most
    the model's maximum); the KV types given, else the one the planner chose."""
    from .kv_types import KvType
    from .niah.ruler.grid import RULER_MIN_CTX, length_ladder
    from .niah.ruler.run import SuiteParams

    if lengths is not None and (min_ctx is not None or max_ctx is not None):
        raise click.UsageError("--lengths gives every length: drop --min-ctx/--max-ctx")
    estimate = launch.choice.estimate
    if lengths is not None:
        chosen = _lengths(lengths)
    else:
        top = max_ctx or min(estimate.ctx, launch.spec.n_ctx_train)
        chosen = tuple(length_ladder(top, min_ctx=RULER_MIN_CTX if min_ctx is None else min_ctx))
    kv = tuple(KvType.parse(k) for k in kv_types) or (KvType(estimate.type_k, estimate.type_v),)
    return SuiteParams(lengths=chosen, kv_types=kv, tasks=_tasks(tasks), samples=4 if samples is None else samples,
                       seed=seed)


def run_ruler(options: LaunchOptions, kv_types: tuple[str, ...], *, min_ctx: int | None, max_ctx: int | None,
              lengths: str | None, tasks: str | None, samples: int | None, seed: int, haystack_file: str | None,
              output: Path | None, resume: bool, force: bool, as_json: bool) -> int:
    from .chat.formats import engine_renderer
    from .launch.decide import decide_launch
    from .model_vocab import open_vocabulary
    from .niah.haystack import read_haystack
    from .niah.results import ResultsLog
    from .niah.ruler.grid import suite_cells
    from .niah.ruler.launched import LaunchedModel, suite_launches
    from .niah.ruler.run import prepare_suite, run_identity, run_suite
    from .niah.ruler.summary import summarize
    from .niah.summary import summary_path, write_summary
    from .recall_store import fingerprint, run_log_path, save_recall
    from .ui.console import make_console
    from .ui.launch_view import render_launch
    from .ui.model_loading import download_progress, loading_status
    from .ui.ruler_view import SuiteProgress, render_summary

    out, err = make_console(), make_console(stderr=True)
    haystack = read_haystack(haystack_file)
    with download_progress(err) as download:
        planned = decide_launch(options, download=download)
    params = suite_params(planned, kv_types, min_ctx=min_ctx, max_ctx=max_ctx, lengths=lengths, tasks=tasks,
                          samples=samples, seed=seed)
    suite_cells(params.kv_types, params.lengths, params.tasks, params.samples)   # refused before anything loads
    launches = suite_launches(planned, params.kv_types, params.n_ctx)
    first = launches[params.kv_types[0].label]
    path, chat_format = first.model_path, first.chat_format
    model_fingerprint = fingerprint(path)
    settings: dict[str, Any] = {"flash_attn": options.flash_attn, "rope_theta": options.rope_theta,
                                "rope_scale": options.rope_scale,
                                "chat_format": chat_format.key if chat_format is not None else None}
    output = output or run_log_path(model_fingerprint)
    log = ResultsLog(output, run_identity(path, model_fingerprint, haystack, params, settings), resume=resume,
                     force=force)
    with open_vocabulary(str(path)) as vocabulary:
        suite = prepare_suite(vocabulary, engine_renderer(vocabulary, chat_format), haystack, params)
        render_launch(first, err)
        for note in suite.notes:
            err.print(f"note: {note}", highlight=False, markup=False)
        model = LaunchedModel(launches, seed=seed, loading=loading_status(err))
        try:
            with log, SuiteProgress(err) as bar:
                run_suite(model, suite, log, on_event=bar.update)
        except KeyboardInterrupt:
            click.echo(f"error: interrupted; {len(log.done)} finished cells are in {output} (continue with "
                       "--resume)", err=True)
            return 130
    per_kv = {kv: {"flash_attn": launch.config.flash_attn, "n_ctx": launch.config.n_ctx,
                   "n_gpu_layers": launch.config.n_gpu_layers} for kv, launch in launches.items()}
    summary = summarize(suite, log.done, model=path.name, results=str(output), settings={**settings, "kv": per_kv})
    summary["fingerprint"] = model_fingerprint
    write_summary(summary, summary_path(output))
    if any(entry["longest_measured"] is not None for entry in summary["kv_types"]):
        summary["stored"] = str(save_recall(model_fingerprint, path.name, summary))
    render_summary(summary, err if as_json else out)
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
