"""A Hub repo's tokenizer files alone (no weights), for counting a document's tokens before anything is downloaded
(`estimate --file`, `read --model`). Beside hub.py, which is full, and through its error mapping and the settings of
the environment read at every call (hub_settings): with hub.py, the only modules that import huggingface_hub."""
from __future__ import annotations

from pathlib import Path

from . import hub_settings as settings
from .errors import HubError
from .hub import _hub_errors

# What counting tokens for a safetensors repo needs: the tokenizer and the files the converter reads it with
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


def download_tokenizer_files(repo_id: str, revision: str | None = None) -> Path:
    """A repo's tokenizer files alone (no weights) into the HF cache; returns the snapshot folder holding them.
    tokenizer.json and config.json are required, the others are read when the repo has them."""
    from huggingface_hub import get_token, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    endpoint, token = settings.endpoint(), get_token()
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token), cache_may_answer=True):
        download = {"cache_dir": settings.hub_cache_dir(), "endpoint": endpoint, "token": token,
                    "local_files_only": settings.offline(), "etag_timeout": settings.etag_timeout()}
        try:
            first = Path(hf_hub_download(repo_id, "tokenizer.json", revision=revision, **download))
        except EntryNotFoundError:
            raise HubError(repo_id, "has no tokenizer.json, so its tokens cannot be counted before download") from None
        commit = first.parent.name  # the cache names snapshot folders by commit: the other files from the same one
        for name in TOKENIZER_FILES:
            if name == "tokenizer.json":
                continue
            try:
                hf_hub_download(repo_id, name, revision=commit, **download)
            except EntryNotFoundError:
                if name == "config.json":
                    raise HubError(repo_id, "has no config.json") from None
    return first.parent
