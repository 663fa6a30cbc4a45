"""A compact panel with the chosen plan, why, and (with --verify) llama.cpp's own figures beside ours; with more than
one device, where the layers go and what each device (each host) holds."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

GIB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB // 4 else f"{n / (1 << 20):,.2f} MiB"


def host_label(device: dict[str, Any]) -> str:
    return device["host"] or "this machine"


def layer_range(device: dict[str, Any]) -> str:
    """"0–19 (20)", "20–46 (27) + output", "output", "—"."""
    first, n = device["first_layer"], device["layers"]
    held = f"{first}–{first + n - 1} ({n})" if n > 1 else (f"{first} (1)" if n else "")
    if device["output_layer"]:
        held = f"{held} + output" if held else "output"
    return held or "—"


def render_plan(model: str, plan: dict[str, Any], console: Console) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    kv = plan["type_k"] if plan["type_k"] == plan["type_v"] else f"{plan['type_k']}/{plan['type_v']}"
    grid.add_row("context", f"{plan['ctx']:,} tokens · KV {kv} · flash attention {'on' if plan['flash_attn'] else 'off'}")
    workers = [d for d in plan["devices"] if d["host"]]
    if workers:
        hosts = len({d["host"] for d in workers}) + 1
        grid.add_row("offload", f"{plan['n_gpu_layers']} layers (output included) off this machine's CPU, over "
                                f"{hosts} hosts: -ngl {plan['n_gpu_layers']}, tensor split "
                                f"{','.join(map(str, plan['tensor_split']))}")
    else:
        grid.add_row("offload", f"{plan['n_gpu_layers']} layers on the GPU" if plan["n_gpu_layers"] else "CPU only")
    grid.add_row("memory", " · ".join(f"{d['name']} {_gib(d['bytes'])} of {_gib(d['free_bytes'])} free"
                                      for d in plan["devices"]))
    grid.add_row("why", plan["why"])
    measured = plan.get("llama_cpp")
    rows = [("weights", "weights_bytes"), ("KV cache", "kv_bytes"), ("compute", "compute_bytes"), ("output", "output_bytes")]
    table = Table(box=None, padding=(0, 2))
    table.add_column("")
    table.add_column("lcrun estimate", justify="right")
    if measured:
        table.add_column("llama.cpp (dry run)", justify="right")
        table.add_column("difference", justify="right")
    for label, key in rows:
        cells = [label, _gib(plan[key])]
        if measured:
            diff = plan[key] - measured[key]
            cells += [_gib(measured[key]), f"{diff:+,} B"]
        table.add_row(*cells)
    console.print(Panel.fit(Table.grid().add_row(grid) or grid, title=f"plan · {model}", title_align="left"))
    if len([d for d in plan["devices"] if d["bytes"]]) > 1:
        render_devices(plan, console)
    console.print(table)
    for note in plan.get("notes", []):
        console.print(f"[dim]note: {note}[/]")


def render_devices(plan: dict[str, Any], console: Console) -> None:
    """Per device, grouped by host: the layers it holds, its weights, KV cache and compute buffer; with --verify,
    llama.cpp's own weights and KV for that device, which match to the byte."""
    measured = (plan.get("llama_cpp") or {}).get("devices")
    table = Table(box=None, padding=(0, 2), title="per device (llama.cpp's order)", title_justify="left")
    for column in ("host", "device", "layers"):
        table.add_column(column)
    for column in ("weights", "KV cache", "compute", "needs", "free"):
        table.add_column(column, justify="right")
    if measured is not None:
        table.add_column("llama.cpp weights", justify="right")
        table.add_column("llama.cpp KV", justify="right")
    order = sorted(plan["devices"], key=lambda d: (d["host"] != "" or d["name"] != "CPU", d["first_layer"]))
    for device in order:
        if not device["bytes"]:
            continue
        name = device["name"].split("[", 1)[0] if device["host"] else device["name"]  # the host column says where
        cells = [host_label(device), name, layer_range(device), _gib(device["weights_bytes"]),
                 _gib(device["kv_bytes"]), _gib(device["compute_bytes"]), _gib(device["bytes"]),
                 _gib(device["free_bytes"])]
        if measured is not None:
            got = measured.get(device["name"], {"weights_bytes": 0, "kv_bytes": 0})
            cells += [_mark(got["weights_bytes"], device["weights_bytes"]), _mark(got["kv_bytes"], device["kv_bytes"])]
        table.add_row(*cells)
    console.print(table)


def _mark(measured: int, planned: int) -> str:
    return _gib(measured) + (" =" if measured == planned else f" ({measured - planned:+,} B)")
