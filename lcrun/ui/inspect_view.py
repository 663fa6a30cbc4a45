"""`lcrun inspect`: a GGUF report at a glance — key facts, tensor types, then warnings."""
from __future__ import annotations

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lcrun.gguf_inspect import GGUFReport, TokenRef

# provenance keys worth a line, in order; the rest stay in --json
_PROVENANCE = ("general.source.repo_url", "general.source.url", "general.base_model.0.repo_url",
               "general.base_model.0.name", "general.quantized_by", "general.license")


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError  # unreachable


def _count(n: int) -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= threshold:
            return f"{n / threshold:.2f} {suffix}"
    return str(n)


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


def _joined(*parts: str | None) -> str:
    return " · ".join(p for p in parts if p)


def _token(label: str, ref: TokenRef | None) -> str | None:
    if ref is None:
        return None
    return f"{label} {ref.id} {ref.text}" if ref.text is not None else f"{label} {ref.id}"


def _rope_line(report: GGUFReport) -> str:
    rope = report.rope
    parts = [f"base {_num(rope.freq_base)}"]
    if rope.scaling_type not in (None, "none"):
        scaling = f"{rope.scaling_type} ×{_num(rope.scaling_factor)}"
        if rope.original_context_length:
            scaling += f" from {rope.original_context_length}"
        parts.append(scaling)
    if rope.freqs_present:
        spread = (f", {rope.freqs_min:.4g}–{rope.freqs_max:.4g}"
                  if rope.freqs_min is not None and rope.freqs_max is not None else "")
        parts.append(f"rope_freqs {rope.freqs_length} factors{spread}")
    if rope.yarn:
        parts.append(" ".join(f"{k}={_num(v)}" for k, v in rope.yarn.items()))
    if len(parts) == 1:
        parts.append("plain theta")
    return _joined(*parts)


class _Facts:
    """A two-column grid; values are Text, never markup: token texts and names may contain [brackets]."""

    def __init__(self) -> None:
        self.grid = Table.grid(padding=(0, 2))
        self.grid.add_column(style="bold", no_wrap=True)
        self.grid.add_column(overflow="fold")

    def add_row(self, label: str, value: str) -> None:
        self.grid.add_row(Text(label), Text(value))


def _facts(report: GGUFReport) -> Table:
    grid = _Facts()

    files = _bytes(report.file_size)
    if report.split_count > 1:
        files = f"{len(report.paths)} of {report.split_count} splits · {files}"
    grid.add_row("file", _joined(str(report.path), files))
    grid.add_row("model", _joined(report.name, report.architecture, report.size_label,
                                  f"{_count(report.parameter_count)} params", report.file_type,
                                  f"{report.tensor_count} tensors"))

    heads = f"heads {report.head_count}"
    if report.head_count_kv is not None:
        heads += f"/{report.head_count_kv} kv"
    grid.add_row("shape", _joined(f"context {report.context_length}", f"embd {report.embedding_length}",
                                  f"layers {report.block_count}", heads, f"head_dim {report.head_dim}"))
    grid.add_row("rope", _rope_line(report))

    tok = report.tokenizer
    tokenizer = _joined(f"{tok.model or '?'}/{tok.pre or '-'}", f"vocab {tok.vocab_size}")
    grid.add_row("tokenizer", tokenizer)
    specials = _joined(_token("bos", tok.bos), _token("eos", tok.eos), _token("eot", tok.eot), _token("eom", tok.eom))
    if specials:
        grid.add_row("", specials)
    template = "yes" if tok.chat_template else "none"
    if tok.chat_template_names:
        template += f" (+ {', '.join(tok.chat_template_names)})"
    add_bos = {True: "yes", False: "no", None: "?"}[tok.add_bos]
    grid.add_row("chat", _joined(f"template {template}", f"add_bos {add_bos}"))

    for key in _PROVENANCE:
        if key in report.general:
            grid.add_row(key.removeprefix("general."), str(report.general[key]))
    for key, value in report.lcrun.items():
        grid.add_row(key, str(value))
    return grid.grid


def _origins(report: GGUFReport) -> Table:
    """Where the converted tensors came from, one row per kind (`--json` lists every tensor)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("converted from")
    table.add_column("tensors", justify="right")
    counts: dict[str, int] = {}
    for origin in report.tensor_origins.values():
        counts[origin] = counts.get(origin, 0) + 1
    for origin, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(Text(origin), str(n))
    return table


def _types(report: GGUFReport) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("type")
    table.add_column("tensors", justify="right")
    table.add_column("size", justify="right")
    for name, stat in report.tensor_types.items():
        table.add_row(Text(name), str(stat.count), _bytes(stat.bytes))
    return table


def render_inspect(report: GGUFReport, console: Console) -> None:
    title = Text(report.path.name, style="bold")
    parts = [_facts(report), Text(""), _types(report)]
    if report.tensor_origins:
        parts += [Text(""), _origins(report)]
    console.print(Panel(Group(*parts), title=title, title_align="left", box=box.ROUNDED, expand=False))
    for warning in report.warnings:
        console.print(Text.assemble(("warning: ", "bold yellow"), (warning, "yellow")))
