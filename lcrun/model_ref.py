"""What a model reference names, before anything is fetched: a Hub repo id (`org/name`), llama.cpp's -hf form
`org/repo:QUANT`, the quant a GGUF file name states, and which GGUF of a repo's files `org/repo[:QUANT]` means.
Names only: no network (lcrun.hub lists and fetches)."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import HubError, LcrunError

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def looks_like_repo_id(text: str) -> bool:
    """An "org/name" repo id as the Hub spells them, and not a path that exists here."""
    parts = text.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(part) for part in parts):
        return False
    if any(bad in text for bad in ("--", "..")) or text.endswith((".", "-", ".git")):
        return False
    return not Path(text).expanduser().exists()


# llama.cpp's -hf form: org/repo[:QUANT]; a quant name as GGUF file names spell it (Q4_K_M, IQ4_XS, q8_0, F16, BF16, …)
_QUANT_SUFFIX = re.compile(r"^(?P<repo>[^:]+):(?P<quant>[A-Za-z0-9_]+)$")
# (a quant ends where a `-` or a `.` follows: `-Q4_K_M.gguf`, `-Q4_K_M-00001-of-00002.gguf`, `.Q8_0.gguf`)
_QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])((?:I?Q\d+_[A-Z0-9_]*?|Q\d+_\d|Q\d+|BF16|F16|F32|TQ\d_\d|MXFP4))"
                            r"(?=[-.])", re.IGNORECASE)


def split_model_ref(text: str) -> tuple[str, str | None]:
    """("org/repo", "QUANT") for llama.cpp's `org/repo:QUANT`, ("org/repo", None) without a quant; anything else is
    returned whole, with no quant."""
    match = _QUANT_SUFFIX.match(text)
    if match and looks_like_repo_id(match["repo"]):
        return match["repo"], match["quant"]
    return text, None


def quant_in_file_name(filename: str) -> str | None:
    """The quant a GGUF file name states (the last one, as in `Model-8B-Instruct-Q4_K_M.gguf`), upper-cased."""
    found = _QUANT_IN_NAME.findall(filename.rsplit("/", 1)[-1])
    return found[-1].upper() if found else None


def choose_gguf(repo_id: str, files: list[str], quant: str | None) -> str:
    """The GGUF (the first file of a split set) that `org/repo[:QUANT]` means among `files`, or a one-line HubError
    listing what the repo has."""
    from .gguf_split import is_first_split

    # the first file of each split set; vision projectors (mmproj) are not models to chat with
    models = [f for f in files if f.lower().endswith(".gguf") and is_first_split(f) and "mmproj" not in f.lower()]
    if not models:
        raise HubError(repo_id, "has no .gguf files (for a safetensors repo, run `lcrun convert` first)")
    quants = sorted({q for q in (quant_in_file_name(f) for f in models) if q})
    if quant is None:
        if len(models) == 1:
            return models[0]
        raise HubError(repo_id, f"holds {len(models)} GGUFs; pick one with {repo_id}:QUANT "
                                f"({', '.join(quants) or ', '.join(models[:8])})")
    chosen = [f for f in models if quant_in_file_name(f) == quant.upper()]
    if not chosen:
        raise HubError(repo_id, f"has no {quant} GGUF; it has {', '.join(quants) or ', '.join(models[:8])}")
    if len(chosen) > 1:
        raise HubError(repo_id, f"has {len(chosen)} {quant} GGUFs ({', '.join(chosen[:4])}); "
                                "give the file's path instead")
    return chosen[0]


def split_names(repo_id: str, filename: str) -> list[str]:
    """The files of `filename`'s split set in a Hub repo; a split name that cannot be one (`-00001-of-00000.gguf`)
    is a one-line HubError."""
    from .gguf_split import split_set_names

    try:
        return split_set_names(filename)
    except LcrunError as malformed:
        raise HubError(repo_id, str(malformed)) from None
