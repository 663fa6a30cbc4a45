"""This machine's prefill speed, as `lcrun bench` measured it, kept per model file so that `lcrun chat` can say how
long a document will take to prefill before it starts: `<user data>/lcrun/speed/<fingerprint>.json` (platformdirs; on
Linux ~/.local/share/lcrun/speed/), files known by lcrun.recall_store's fingerprint (size and sampled bytes, not the
name). One entry per run setting — KV types, flash attention, GPU layers, threads, micro-batch — since
each changes the speed; the chat uses an entry only when its own settings are the same, and shows no estimate
otherwise. The latest bench run of a setting replaces the one before.

Prompt processing slows as the context fills (attention reads every cached token), so one figure would mislead for a
long document: bench measures `pp` tokens at several depths, and the time of tokens [a, b) is the integral of the time
per token, linear between the depths measured (at each measurement's middle) and, past the deepest, going on with the
last slope — attention's cost grows linearly with depth. With one depth measured, the time per token is taken as
constant: an underestimate for a long document, which the chat's table marks."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .atomic_files import write_atomic
from .errors import LcrunError
from .model_stores import read_store, store_dir as model_store_dir

STORE_KIND = "lcrun-prefill-speed"
STORE_VERSION = 1
_MAX_STORE_BYTES = 1 << 20
SETTING_KEYS = ("type_k", "type_v", "flash_attn", "n_gpu_layers", "n_threads", "n_ubatch")


class SpeedStoreError(LcrunError):
    """A stored speed file that cannot be read or is not one."""


def store_dir() -> Path:
    return model_store_dir("speed")


def setting_key(settings: Mapping[str, Any]) -> str:
    """The settings that change the speed, as one string: `f16/f16 fa=on ngl=0 threads=8 ubatch=512`."""
    return (f"{settings['type_k']}/{settings['type_v']} fa={'on' if settings['flash_attn'] else 'off'} "
            f"ngl={settings['n_gpu_layers']} threads={settings['n_threads']} ubatch={settings['n_ubatch']}")


@dataclass(frozen=True)
class PrefillSpeed:
    points: tuple[tuple[float, float], ...]   # (depth at a measurement's middle, seconds per token), by depth
    measured_at: str = ""

    @property
    def deepest(self) -> float:
        return self.points[-1][0]

    def _per_token(self, depth: float) -> float:
        points = self.points
        if depth <= points[0][0] or len(points) == 1:
            return points[0][1]
        for (x0, t0), (x1, t1) in zip(points, points[1:]):
            if depth <= x1:
                return t0 + (t1 - t0) * (depth - x0) / (x1 - x0)
        (x0, t0), (x1, t1) = points[-2], points[-1]
        return t1 + max(t1 - t0, 0.0) * (depth - x1) / (x1 - x0)

    def seconds(self, start: int, end: int) -> float:
        """The time to prefill prompt positions [start, end) when the cache holds the `start` before them: exact for
        the piecewise-linear time per token (trapezoids between its breakpoints)."""
        if end <= start:
            return 0.0
        cuts = sorted({float(start), float(end), *(x for x, _ in self.points if start < x < end)})
        return sum((self._per_token(a) + self._per_token(b)) / 2 * (b - a) for a, b in zip(cuts, cuts[1:]))


def _fingerprint(model_path: Path) -> str:
    from .recall_store import fingerprint

    return fingerprint(model_path)


def _read(path: Path) -> dict[str, Any] | None:
    data = read_store(path, kind=STORE_KIND, max_bytes=_MAX_STORE_BYTES, error=SpeedStoreError,
                      redo="run lcrun bench again")
    if data is not None and (data.get("version") != STORE_VERSION or not isinstance(data.get("settings"), dict)):
        raise SpeedStoreError(str(path), f"is not a {STORE_KIND} file (version {STORE_VERSION}): delete it, and run "
                                         "lcrun bench again")
    return data


def save_measured(model_path: Path, settings: Mapping[str, Any], pp: int,
                  rates: Sequence[tuple[int, float]]) -> Path:
    """Keep bench's prompt-processing rates (depth, tokens/s) of `model_path` under `settings`, replacing an earlier
    measurement with the same settings."""
    path = store_dir() / f"{_fingerprint(model_path)}.json"
    try:
        data = _read(path)
    except SpeedStoreError:
        data = None  # a damaged file is replaced by what was just measured
    data = data or {"kind": STORE_KIND, "version": STORE_VERSION, "settings": {}}
    data["model"] = model_path.name
    data["settings"][setting_key(settings)] = {
        **{key: settings[key] for key in SETTING_KEYS}, "pp": pp,
        "pp_tokens_per_s": {str(depth): rate for depth, rate in rates if rate > 0},
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(path, json.dumps(data, indent=1) + "\n", make_parents=True, error=SpeedStoreError)
    return path


def measured_speed(model_path: Path, settings: Mapping[str, Any]) -> PrefillSpeed | None:
    """The speed bench measured for this file with these settings; None when it never did. The file is fingerprinted
    only when anything is stored at all, so a machine where bench never ran pays nothing."""
    folder = store_dir()
    if not folder.is_dir() or not any(name.endswith(".json") for name in os.listdir(folder)):
        return None
    data = _read(folder / f"{_fingerprint(model_path)}.json")
    entry = data["settings"].get(setting_key(settings)) if data else None
    if not isinstance(entry, dict):
        return None
    try:
        pp = int(entry["pp"])
        points = sorted((int(depth) + pp / 2, 1.0 / float(rate)) for depth, rate in entry["pp_tokens_per_s"].items()
                        if float(rate) > 0)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # a damaged entry: no estimate (the next bench run replaces it)
    return PrefillSpeed(tuple(points), str(entry.get("measured_at", ""))) if points else None
