"""The Hugging Face Hub boundary: the only module that imports huggingface_hub.

Checkpoints go into the normal Hugging Face cache and are read back through huggingface_hub, never written by hand.
huggingface_hub reads its environment once, at its own import; the settings that matter here (endpoint, cache,
offline mode, token, timeouts) are read again from the environment at every call, so the caller's environment wins.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import HubError

# What a checkpoint needs, and nothing else: no .bin/.pth duplicates of the weights, no `original/` folder, no
# consolidated single-file copies (Mistral ships both, which would double the download).
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
)
# huggingface_hub's `*` crosses `/`, so "*/*" is what keeps the download to the repo's top level
IGNORED_PATTERNS = ("*/*", "consolidated*")

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_TRUE = {"1", "ON", "YES", "TRUE"}
_DEFAULT_ENDPOINT = "https://huggingface.co"


def looks_like_repo_id(text: str) -> bool:
    """An "org/name" repo id as the Hub spells them, and not a path that exists here."""
    parts = text.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(part) for part in parts):
        return False
    if any(bad in text for bad in ("--", "..")) or text.endswith((".", "-", ".git")):
        return False
    return not Path(text).expanduser().exists()


def download_checkpoint(repo_id: str, revision: str | None = None, *,
                        progress: Callable[[int, int], None] | None = None) -> tuple[Path, str]:
    """Download the safetensors checkpoint of `repo_id` into the HF cache; returns (snapshot_dir, commit_sha).

    `progress(done, total)` gets bytes, from the download threads; files already in the cache count as done.
    """
    from huggingface_hub import HfApi, get_token, snapshot_download, try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    endpoint = _endpoint()
    cache_dir = _hub_cache_dir()
    offline = _offline()
    token = get_token()
    patterns = {"allow_patterns": list(CHECKPOINT_PATTERNS), "ignore_patterns": list(IGNORED_PATTERNS)}
    try:
        sizes: dict[str, int] = {}
        cached = 0
        if not offline:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
            wanted = filter_repo_objects(info.siblings or [], key=lambda sibling: sibling.rfilename, **patterns)
            sizes = {sibling.rfilename: sibling.size or 0 for sibling in wanted}
            _require_safetensors(repo_id, sizes)
            cached = sum(size for name, size in sizes.items()
                         if isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=info.sha),
                                       str))
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint, token=token,
            local_files_only=offline, etag_timeout=_etag_timeout(),
            tqdm_class=_progress_bar_class(progress, total=sum(sizes.values()), initial=cached), **patterns,
        )
    except HubError:
        raise
    except Exception as error:
        mapped = _hub_error(repo_id, revision, error, offline=offline, endpoint=endpoint, token_sent=bool(token))
        if mapped is None:
            raise
        raise mapped from error
    snapshot = Path(folder)
    _require_safetensors(repo_id, (path.name for path in snapshot.iterdir()))
    if progress is not None and sizes:
        progress(sum(sizes.values()), sum(sizes.values()))
    return snapshot, snapshot.name  # the cache names snapshot folders by commit


def _require_safetensors(repo_id: str, names: Iterable[str]) -> None:
    if not any(name.endswith(".safetensors") for name in names):
        raise HubError(repo_id, "has no safetensors weights (only safetensors checkpoints are supported, "
                                "not .bin or .pth)")


def _hub_error(repo_id: str, revision: str | None, error: Exception, *, offline: bool, endpoint: str,
               token_sent: bool) -> HubError | None:
    """One line with the next step, for every way the Hub can say no; None for errors that are not the Hub's."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    login = "set HF_TOKEN (or run `huggingface-cli login`)"
    gated = HubError(repo_id, f"the repo is gated or private: accept its license on the Hub, then {login}")
    if isinstance(error, GatedRepoError):
        return gated
    if isinstance(error, RevisionNotFoundError):
        return HubError(repo_id, f"no revision {revision or 'main'!r} in this repo (give a branch, tag or commit)")
    if isinstance(error, RepositoryNotFoundError):
        hint = "" if token_sent else f"; if it is private, {login}"
        return HubError(repo_id, f"no such model repo on the Hub (check the spelling{hint})")
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401 and token_sent:
            return HubError(repo_id, "the Hub rejected the token from HF_TOKEN or `huggingface-cli login`: "
                                     "check that it is valid")
        if status in (401, 403):
            return gated
        if status < 500:
            return HubError(repo_id, f"the Hub refused the download (HTTP {status})")
        # 5xx falls through: the Hub is down, which is "unreachable" for the user
    elif isinstance(error, HFValidationError):
        return HubError(repo_id, "not a valid Hugging Face repo id (org/name)")
    if not isinstance(error, (LocalEntryNotFoundError, HfHubHTTPError, *_transport_errors())):
        return None
    if offline:
        return HubError(repo_id, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so the Hub cannot "
                                 "be reached; give a local checkpoint directory instead")
    return HubError(repo_id, f"the Hugging Face Hub ({endpoint}) cannot be reached; check the connection, "
                             "or give a local checkpoint directory instead")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures, from whichever HTTP library this huggingface_hub version uses (it is loaded by now)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    found: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module_name, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                               ("requests", ("ConnectionError", "Timeout"))):
        module = sys.modules.get(module_name)
        found += [getattr(module, name) for name in names if module is not None and hasattr(module, name)]
    return tuple(found)


def _progress_bar_class(progress: Callable[[int, int], None] | None, *, total: int, initial: int) -> type | None:
    """A tqdm stand-in for snapshot_download that renders nothing and forwards bytes to `progress`.

    snapshot_download makes a files bar and two byte bars (bytes received, bytes written); both byte bars see
    every byte of a plain HTTP download, so the larger of the two is the bytes done.
    """
    if progress is None:
        return None
    lock = threading.Lock()
    byte_counts: list[list[int]] = []

    def report() -> None:
        done = initial + max((count[0] for count in byte_counts), default=0)
        progress(min(done, total) if total else done, total or done)

    class ForwardingBar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n = kwargs.get("initial") or 0
            self.total = kwargs.get("total")
            self.format_dict: dict[str, Any] = {"rate": None}
            self._count: list[int] | None = None
            if kwargs.get("unit") == "B":
                self._count = [0]
                with lock:
                    byte_counts.append(self._count)

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0
            if self._count is not None and n:
                with lock:
                    self._count[0] += int(n)
                    report()

        def __enter__(self) -> ForwardingBar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def __getattr__(self, name: str) -> Callable[..., None]:
            # close, refresh, set_description, set_postfix_str, ...: nothing to render
            return lambda *args, **kwargs: None

    return ForwardingBar


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).rstrip("/")


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def _etag_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


def _hub_cache_dir() -> Path:
    """Where huggingface_hub puts its cache, by the same precedence it uses, read now rather than at its import."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"
