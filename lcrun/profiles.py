"""Facts derived from the built-in profiles' configs through the converter's own architecture adapters."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lcrun.convert.arch import ModelAdapter, adapter_for
from lcrun.models import Profile


def profile_adapter(profile: Profile) -> ModelAdapter:
    return adapter_for(profile.config, Path(f"<profile {profile.name}>"))


def parameter_count(adapter: ModelAdapter) -> int:
    total = 0
    for _name, shape in adapter.gguf_tensors():
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def rope_summary(adapter: ModelAdapter) -> str:
    rope = adapter.rope
    theta = f"θ {rope.theta:.4g}"
    if rope.kind == "none":
        return theta
    if rope.kind == "llama3":
        return f"{theta} llama3 ×{rope.factor:g}/{rope.original_context // 1024}K"
    return f"{theta} {rope.kind} ×{rope.factor:g}"


def describe_profiles(profiles: Iterable[Profile]) -> list[tuple[Profile, int, str]]:
    rows = []
    for profile in profiles:
        adapter = profile_adapter(profile)
        rows.append((profile, parameter_count(adapter), rope_summary(adapter)))
    return rows
