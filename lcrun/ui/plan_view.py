"""A compact panel with the chosen plan, why, and (with --verify) llama.cpp's own figures beside ours."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

GIB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB // 4 else f"{n / (1 << 20):,.2f} MiB"


def render_plan(model: str, plan: dict[str, Any], console: Console) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    kv = plan["type_k"] if plan["type_k"] == plan["type_v"] else f"{plan['type_k']}/{plan['type_v']}"
    grid.add_row("context", f"{plan['ctx']:,} tokens · KV {kv} · flash attention {'on' if plan['flash_attn'] else 'off'}")
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
    console.print(table)
    for note in plan.get("notes", []):
        console.print(f"[dim]note: {note}[/]")
