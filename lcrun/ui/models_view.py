"""The table of built-in model profiles (`lcrun models`)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lcrun.models import Profile
from lcrun.recall_advice import ctx_label


def render_profiles(rows: list[tuple[Profile, int, str]], console: Console) -> None:
    """rows: (profile, parameter count, RoPE summary)."""
    table = Table(title="Built-in model profiles (estimates need no download)", title_justify="left",
                  caption="effective: RULER's published effective context (suite score ≥ 85.6; arXiv 2404.06654, "
                          "NVIDIA/RULER README), for the bf16 model", caption_justify="left")
    numeric = ("params", "layers", "context", "effective")
    for column in ("profile", "Hub repo", "params", "layers", "heads/kv", "context", "effective", "RoPE"):
        table.add_column(column, justify="right" if column in numeric else "left", no_wrap=column != "RoPE")
    for profile, n_params, rope in rows:
        c = profile.config
        effective = ctx_label(profile.ruler.effective_context) if profile.ruler else "–"
        table.add_row(profile.name, profile.repo_id, f"{n_params / 1e9:.1f}B", str(c["num_hidden_layers"]),
                      f"{c['num_attention_heads']} / {c['num_key_value_heads']}",
                      f"{c['max_position_embeddings']:,}", effective, rope)
    console.print(table)
