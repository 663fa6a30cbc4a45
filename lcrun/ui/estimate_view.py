"""The estimate table: rows quant × context, columns KV type; what fits the machine highlighted."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lcrun.devices import Device
from lcrun.estimate import MemoryEstimate
from lcrun.memory_model import kv_type_name
from lcrun.models import published_recall
from lcrun.recall_advice import RecallAdvice, ctx_label

from .ruler_view import render_recall_advice

GIB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GIB:,.1f}"


def render_estimate(model: str, source_note: str, devices: Sequence[Device], estimates: Sequence[MemoryEstimate],
                    largest: dict[tuple[str, str], int], console: Console,
                    recall: Sequence[RecallAdvice] = ()) -> None:
    """`recall`: for a local GGUF measured with the suite, the advice for each largest context that fits."""
    kv_types = list(dict.fromkeys(kv_type_name(e.type_k, e.type_v) for e in estimates))
    machine = ", ".join(f"{d.name} {_gib(d.free_bytes)} GiB free{'' if d.detected else ' (given)'}"
                        for d in devices if not d.host)
    console.print(Text(f"{model}  ·  {source_note}", style="bold"))
    published = published_recall(model)
    if published is not None:
        figures, advertised = published
        console.print(Text(f"published effective context: {ctx_label(figures.effective_context)} of the "
                           f"{ctx_label(advertised)} advertised (RULER suite score ≥ 85.6, bf16 weights; "
                           "arXiv 2404.06654); a quant or KV cache type of your own is not measured",
                           style="dim"))
    console.print(Text(f"machine: {machine}", style="dim"))
    workers = [d for d in devices if d.host]
    if workers:
        listed = ", ".join(f"{d.name} {_gib(d.free_bytes)} GiB free{'' if d.detected else ' (given)'}"
                           for d in workers)
        console.print(Text(f"workers: {listed}", style="dim"))
    table = Table(show_lines=False, title_justify="left",
                  caption="GiB: total = weights + KV + compute + output; green fits, red does not", caption_justify="left")
    table.add_column("quant")
    table.add_column("context", justify="right")
    table.add_column("weights", justify="right")
    for kv in kv_types:
        table.add_column(f"KV {kv}", justify="right")
        table.add_column(f"total ({kv})", justify="right")
    rows: dict[tuple[str, int], dict[str, MemoryEstimate]] = {}
    for estimate in estimates:
        rows.setdefault((estimate.quant, estimate.ctx), {})[kv_type_name(estimate.type_k, estimate.type_v)] = estimate
    for (quant, ctx), by_kv in rows.items():
        first = next(iter(by_kv.values()))
        cells: list[Text | str] = [quant, f"{ctx:,}", _gib(first.weights_bytes)]
        for kv in kv_types:
            estimate = by_kv.get(kv)
            if estimate is None:
                cells += ["", ""]
                continue
            cells.append(_gib(estimate.kv_bytes))
            cells.append(Text(_gib(estimate.total_bytes), style="bold green" if estimate.fits else "red"))
        table.add_row(*cells)
    console.print(table)
    for (quant, kv), ctx in largest.items():
        verdict = f"up to {ctx:,} tokens" if ctx else "does not fit at any context"
        console.print(f"largest context that fits: {quant} with KV {kv}: {verdict}")
    for advice in recall:
        render_recall_advice(advice, console)
    if workers:
        render_spread(estimates, console)


def render_spread(estimates: Sequence[MemoryEstimate], console: Console) -> None:
    """How each quant × KV type spreads over the hosts at the longest context that fits (else the shortest asked,
    with what is missing): llama.cpp's -ngl and tensor split, and what each host holds."""
    chosen: dict[tuple[str, str], MemoryEstimate] = {}
    for estimate in estimates:
        key = (estimate.quant, kv_type_name(estimate.type_k, estimate.type_v))
        best = chosen.get(key)
        if best is None or (estimate.fits and (not best.fits or estimate.ctx > best.ctx)) or \
                (not estimate.fits and not best.fits and estimate.ctx < best.ctx):
            chosen[key] = estimate
    for (quant, kv), estimate in chosen.items():
        state = "fits" if estimate.fits else f"does not fit ({estimate.binding})"
        console.print(Text(f"spread of {quant}, KV {kv} at {estimate.ctx:,} tokens: {state}; "
                           f"-ngl {estimate.n_gpu_layers}, tensor split {','.join(map(str, estimate.tensor_split)) or '—'}", style="bold"))
        hosts: dict[str, list] = {}
        for use in estimate.devices:
            hosts.setdefault(use.host or "this machine", []).append(use)
        for host, uses in hosts.items():
            layers = sum(u.layers for u in uses) + sum(u.output_layer for u in uses)
            need = sum(u.bytes for u in uses)
            free = sum(u.free_bytes for u in uses)
            console.print(f"  {host}: {layers} layer(s){' incl. output' if any(u.output_layer for u in uses) else ''}"
                          f" · weights {_gib(sum(u.weights_bytes for u in uses))} + KV {_gib(sum(u.kv_bytes for u in uses))}"
                          f" + compute {_gib(sum(u.compute_bytes for u in uses))} GiB = {_gib(need)} of {_gib(free)} GiB "
                          "free", highlight=False)
        if estimate.shortfall_bytes:
            console.print(f"  {estimate.shortfall_bytes / GIB:,.1f} GiB more memory is needed over all hosts",
                          highlight=False)


def render_document_estimate(model: str, source_note: str, devices: Sequence[Device], estimate: Any,
                             console: Console) -> None:
    """The documents' tokens for this model, then per quant and KV type the memory at the context they need, and
    the one line that says what to run."""
    machine = ", ".join(f"{d.name} {_gib(d.free_bytes)} GiB free{'' if d.detected else ' (given)'}" for d in devices)
    console.print(Text(f"{model}  ·  {source_note}", style="bold"))
    console.print(Text(f"machine: {machine}", style="dim"))
    for document, tokens in zip(estimate.documents, estimate.tokens):
        size = (f"{document.pages:,} pages, " if document.pages is not None else "") + \
               (f"{document.files:,} files, " if document.files is not None else "")
        console.print(f"{document.name}: {document.kind}, {size}{document.characters:,} characters — "
                      f"[bold]{tokens:,} tokens[/] for this model")
        for warning in document.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
    table = Table(caption="GiB: total = weights + KV + compute + output at that context", caption_justify="left")
    for name, justify in (("quant", "left"), ("context", "right"), ("KV", "left"), ("total GiB", "right"),
                          ("here", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for fit in estimate.fits:
        for option in fit.options:
            kv = option.type_k if option.type_k == option.type_v else f"{option.type_k}/{option.type_v}"
            table.add_row(fit.quant, f"{fit.needed_ctx:,}", kv, _gib(option.estimate.total_bytes),
                          Text("fits", style="green") if option.fits else Text("does not fit", style="red"))
    if any(fit.options for fit in estimate.fits):
        console.print(table)
    for fit in estimate.fits:
        style = "green" if fit.fits else "red"
        console.print(Text(f"{fit.quant}: ", style="bold") + Text(fit.fix(), style=style))
