"""lcrun.models: data shipped with lcrun — built-in model profiles and a tiny demo checkpoint."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def demo_checkpoint() -> Path:
    """A tiny Llama-3-style checkpoint (random weights, llama3 RoPE scaling) for trying lcrun with no download."""
    return Path(str(files("lcrun.models") / "demo"))
