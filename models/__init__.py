"""lcrun.models: data shipped with lcrun — built-in profiles of known long-context models, and a tiny demo checkpoint.

A profile holds the model's config.json fields, so estimates for it need no network at all."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PublishedRecall:
    """RULER's published measurement of the model (bf16 weights, its 13 tasks): the suite score per length and the
    effective context, the longest length scoring at least 85.6 (arXiv 2404.06654)."""
    effective_context: int
    scores: dict[int, float]
    source: str


@dataclass(frozen=True)
class Profile:
    name: str
    repo_id: str
    description: str
    config: dict[str, Any]
    aliases: tuple[str, ...] = field(default_factory=tuple)
    ruler: PublishedRecall | None = None

    def matches(self, text: str) -> bool:
        wanted = text.strip().lower()
        return wanted in {self.name.lower(), self.repo_id.lower(), *(a.lower() for a in self.aliases)}


def demo_checkpoint() -> Path:
    """A tiny Llama-3-style checkpoint (random weights, llama3 RoPE scaling) for trying lcrun with no download."""
    return Path(str(files("lcrun.models") / "demo"))


@cache
def load_profiles() -> tuple[Profile, ...]:
    data = json.loads((files("lcrun.models") / "profiles.json").read_text(encoding="utf-8"))
    return tuple(Profile(name=p["name"], repo_id=p["repo_id"], description=p["description"], config=p["config"],
                         aliases=tuple(p.get("aliases", ())), ruler=_published(p.get("ruler")))
                 for p in data["profiles"])


def _published(entry: dict[str, Any] | None) -> PublishedRecall | None:
    if entry is None:
        return None
    return PublishedRecall(int(entry["effective_context"]), {int(k): float(v) for k, v in entry["scores"].items()},
                           str(entry["source"]))


def find_profile(text: str) -> Profile | None:
    """The profile whose name, repo id or alias is `text` (case-insensitive)."""
    return next((p for p in load_profiles() if p.matches(text)), None)


def published_recall(model: str) -> tuple[PublishedRecall, int] | None:
    """RULER's published figures for the model of a built-in profile (by name, repo id or alias), with the context
    its config advertises; None for models RULER did not publish."""
    profile = find_profile(model)
    if profile is None or profile.ruler is None:
        return None
    return profile.ruler, int(profile.config["max_position_embeddings"])
