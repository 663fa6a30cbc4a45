"""Measured recall, kept per model file: `<user data>/lcrun/recall/<fingerprint>.json` (platformdirs; on Linux
~/.local/share/lcrun/recall/), one entry per KV type, the latest measurement of each. The RULER-style suite writes
it; plan, chat, serve and estimate read it for the file they are given (lcrun.recall_advice makes the advice).

A file is known by a fingerprint, not by its name or path (files are renamed, moved, downloaded twice), and the
fingerprint must be cheap on a 40 GB GGUF: its size, the first MiB (GGUF header: metadata, tokenizer), 8 blocks of
64 KiB at evenly spaced offsets and the last 64 KiB — at most 1.6 MiB read, whatever the size. Two files with the
same size and header that differ only between the sampled blocks would share a fingerprint; a re-quantized or
re-converted file differs in its header or its size."""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .atomic_files import write_atomic
from .errors import LcrunError
from .kv_types import KvType
from .model_stores import read_store, store_dir as model_store_dir
from .recall_advice import KvRecall, StoredRecall

FINGERPRINT_VERSION = 1
_HEAD = 1 << 20
_BLOCK = 64 << 10
_SAMPLES = 8
STORE_KIND = "lcrun-recall"
STORE_VERSION = 1
_MAX_STORE_BYTES = 4 << 20   # a few KiB per KV type: anything near this is not ours


class RecallStoreError(LcrunError):
    """A stored results file that cannot be read or is not one."""


def fingerprint(path: Path) -> str:
    try:
        size = path.stat().st_size
        digest = hashlib.sha256(f"lcrun-fingerprint-{FINGERPRINT_VERSION}:{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_HEAD))
            if size > _HEAD:
                offsets = [_HEAD + (size - _HEAD - _BLOCK) * k // (_SAMPLES + 1) for k in range(1, _SAMPLES + 1)]
                for offset in [*offsets, max(_HEAD, size - _BLOCK)]:
                    f.seek(offset)
                    digest.update(f.read(_BLOCK))
    except OSError as exc:
        raise LcrunError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    return digest.hexdigest()[:32]


def store_dir() -> Path:
    return model_store_dir("recall")


def store_path(model_fingerprint: str) -> Path:
    return store_dir() / f"{model_fingerprint}.json"


def run_log_path(model_fingerprint: str) -> Path:
    """Where the suite's results log goes unless the user names one: beside the stored results, so that a run on
    the same file resumes wherever it is started from."""
    return store_dir() / model_fingerprint / "ruler.jsonl"


def _read(path: Path) -> dict[str, Any] | None:
    data = read_store(path, kind=STORE_KIND, max_bytes=_MAX_STORE_BYTES, error=RecallStoreError, redo="measure again")
    if data is None:
        return None
    if not isinstance(data.get("kv"), dict):
        raise RecallStoreError(str(path), f"is not a {STORE_KIND} file: delete it, and measure again")
    if data.get("version") != STORE_VERSION:
        raise RecallStoreError(str(path), f"version {data.get('version')!r} (this lcrun reads {STORE_VERSION}): "
                                          "measure again to replace it")
    return data


def _kv_recall(label: str, entry: Any, path: Path) -> KvRecall:
    try:
        return KvRecall(
            kv=KvType(str(entry["type_k"]), str(entry["type_v"])),
            effective_context=None if entry["effective_context"] is None else int(entry["effective_context"]),
            first_failing=None if entry["first_failing"] is None else int(entry["first_failing"]),
            longest_measured=None if entry["longest_measured"] is None else int(entry["longest_measured"]),
            threshold=float(entry["threshold"]),
            length_scores={int(k): float(v) for k, v in entry["length_scores"].items()},
        )
    except KeyError as exc:
        raise RecallStoreError(str(path), f"entry {label!r} lacks {exc}: measure again") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise RecallStoreError(str(path), f"entry {label!r} is damaged ({exc}): measure again") from None


def _whole_entries(data: dict[str, Any], path: Path) -> dict[str, Any]:
    kept = {}
    for label, entry in data["kv"].items():
        try:
            _kv_recall(label, entry, path)
        except RecallStoreError:
            continue
        kept[label] = entry
    return kept


def load_recall(model_fingerprint: str) -> StoredRecall | None:
    """The stored results of the file with this fingerprint, or None if it was never measured."""
    path = store_path(model_fingerprint)
    data = _read(path)
    if data is None:
        return None
    by_kv = {label: _kv_recall(label, entry, path) for label, entry in data["kv"].items()}
    return StoredRecall(model_fingerprint, str(data.get("model", "")), by_kv)


def save_recall(model_fingerprint: str, model: str, summary: dict[str, Any]) -> Path:
    """Store the suite summary's KV types that have at least one length measured in full, each replacing the
    earlier measurement of that KV type; the other KV types stored stay."""
    path = store_path(model_fingerprint)
    try:
        data = _read(path)
    except RecallStoreError:
        data = None  # a damaged store is replaced by what was just measured
    data = data or {"kind": STORE_KIND, "version": STORE_VERSION, "fingerprint": model_fingerprint, "kv": {}}
    data["kv"] = _whole_entries(data, path)   # a damaged entry goes: what was just measured replaces it
    data["model"] = model
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for entry in summary["kv_types"]:
        if entry["longest_measured"] is None:
            continue
        data["kv"][entry["kv"]] = {
            "type_k": entry["type_k"], "type_v": entry["type_v"], "threshold": summary["threshold"],
            "effective_context": entry["effective_context"], "first_failing": entry["first_failing"],
            "longest_measured": entry["longest_measured"],
            "length_scores": {str(ctx): score for ctx, score in zip(summary["lengths"], entry["length_scores"])
                              if score is not None},
            "task_scores": {task: {str(ctx): s for ctx, s in zip(summary["lengths"], scores) if s is not None}
                            for task, scores in entry["scores"].items()},
            "samples": summary["samples"], "seed": summary["seed"], "prompt_format": summary["prompt_format"],
            "settings": summary.get("settings", {}), "measured_at": when,
        }
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n", make_parents=True,
                 error=RecallStoreError)
    return path


def measured_for(model_path: Path) -> StoredRecall | None:
    """The stored results of the file at `model_path` (None when it was never measured); the file is fingerprinted
    only when the store has anything at all, so an unmeasured machine pays nothing."""
    folder = store_dir()
    if not folder.is_dir() or not any(name.endswith(".json") for name in os.listdir(folder)):
        return None
    return load_recall(fingerprint(model_path))
