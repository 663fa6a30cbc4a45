"""`lcrun bench`: parse, decide the launch (refusing depths that cannot fit before the model loads), open the model,
measure, render."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from .cli_options import launch_options

if TYPE_CHECKING:
    from pathlib import Path

    from .bench import BenchReport
    from .launch.options import LaunchOptions


def _parse_depth(text: str) -> int:
    from .param_types import parse_ctx

    try:
        return parse_ctx(text)
    except click.BadParameter:
        raise click.BadParameter(f"{text!r} is not a token count like 0, 4096 or 4k", param_hint="--depth") from None


@click.command(epilog="""\b
Examples:
  lcrun bench demo                                        # the built-in tiny model, no download
  lcrun bench model-Q4_K_M.gguf --depth 0 --depth 16k --depth 64k
  lcrun bench model-Q4_K_M.gguf --kv-type q4_0 --depth 32k --json > q4_0.json
  lcrun bench model-Q8_0.gguf --flash-attn off --pp 1024 --tg 64 -r 5
""")
@click.argument("model")
@launch_options(chat=False)
@click.option("--depth", "depths", multiple=True, metavar="N",
              help="Tokens already in the KV cache when pp and tg are timed (repeatable; 0, 4096, 16k, …). "
                   "Default: 0 and 1k, 4k, 16k, 64k, … as far as the context allows.")
@click.option("--pp", type=int, default=512, show_default=True, help="Prompt tokens timed at each depth.")
@click.option("--tg", type=int, default=128, show_default=True, help="Tokens generated at each depth (0: none).")
@click.option("-r", "--repetitions", type=int, default=3, show_default=True,
              help="Measurements per depth (reported as mean ± stddev).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (every repetition included).")
def bench(launch: LaunchOptions, depths: tuple[str, ...], pp: int, tg: int, repetitions: int,
          as_json: bool) -> None:
    """Prompt processing (pp) and generation (tg) speed of MODEL at several context depths, with the planned or
    forced settings: compare quants, KV cache types and flash attention on this machine.

    Without --ctx the context is the smallest that holds the deepest measurement. The cache is filled untimed with
    each depth (smallest first); tokens are the model's own, from seeded random words. The pp rates are kept per
    model file and settings, so that `lcrun chat -f DOC` can say how long DOC will take to prefill here.
    """
    from .bench import bench_report, check_counts, run_bench, set_up_bench
    from .launch.decide import decide_launch
    from .launch.loaded import open_model
    from .ui.bench_view import bench_progress, render_bench
    from .ui.console import make_console
    from .ui.model_loading import download_progress, loading_status

    out, err = make_console(), make_console(stderr=True)
    depth_list = [_parse_depth(d) for d in depths]
    check_counts(depth_list, pp, tg, repetitions)  # before a download
    with download_progress(err) as download:
        setup = set_up_bench(decide_launch(launch, download=download), depth_list, pp=pp, tg=tg,
                             repetitions=repetitions)

    with open_model(setup.launch, loading=loading_status(err)) as model, bench_progress(err) as step:
        results = run_bench(model.engine, setup.depths, pp=pp, tg=tg, repetitions=repetitions, progress=step)
    report = bench_report(setup, results, pp=pp, tg=tg, repetitions=repetitions)
    kept = _keep_prefill_speed(report)
    if as_json:
        for warning in report.warnings:
            err.print(f"warning: {warning}")
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    render_bench(report, out)
    err.print(f"prefill speeds kept for lcrun chat's document estimates: {kept}", style="dim", highlight=False,
              markup=False)


def _keep_prefill_speed(report: BenchReport) -> Path:
    """This machine's pp rates for this file and these settings, where `lcrun chat` reads them (lcrun.prefill_speed)."""
    from .prefill_speed import save_measured

    settings = {"type_k": report.type_k, "type_v": report.type_v, "flash_attn": report.flash_attn,
                "n_gpu_layers": report.n_gpu_layers, "n_threads": report.n_threads, "n_ubatch": report.n_ubatch}
    return save_measured(report.path, settings, report.pp, [(r.depth, r.pp_rate.mean) for r in report.results])
