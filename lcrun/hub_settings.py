"""The Hub settings of the environment — endpoint, cache, offline mode, timeouts — read at every call, as
huggingface_hub reads them once, at its own import: the caller's environment (a test's, a user's `HF_ENDPOINT=…
lcrun …`) wins. No huggingface_hub here."""
from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}
_DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def etag_timeout() -> float:
    return env_seconds("HF_HUB_ETAG_TIMEOUT")


def hub_cache_dir() -> Path:
    """Where huggingface_hub puts its cache, by the same precedence it uses, read now rather than at its import."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def env_seconds(name: str, default: float = 10.0) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def download_timeout() -> float:
    return env_seconds("HF_HUB_DOWNLOAD_TIMEOUT")
