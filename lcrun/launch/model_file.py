"""Which GGUF a run opens: a path (the first file of a split set), `demo` (the built-in checkpoint, converted once),
or a Hub GGUF repo as llama.cpp's -hf takes it, downloaded into the Hugging Face cache."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lcrun.errors import LcrunError


def demo_gguf() -> Path:
    """The built-in demo checkpoint converted once (F16) into the user cache: a model that needs no download."""
    import platformdirs

    from lcrun import __version__
    from lcrun.convert.convert import convert_checkpoint
    from lcrun.models import demo_checkpoint

    path = Path(platformdirs.user_cache_dir("lcrun")) / f"demo-{__version__}-F16.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        convert_checkpoint(demo_checkpoint(), path, outtype="f16")
    return path


def find_model_file(model: str, *, hub_file: str | None = None, revision: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """A GGUF path, `demo`, or a Hub GGUF repo as llama.cpp's -hf takes it: `org/repo:QUANT` (that quant's file or
    split set), `org/repo` (its only GGUF). The file is downloaded into the Hugging Face cache; `progress(done,
    total)` gets its bytes."""
    path = Path(model).expanduser()
    if path.is_file():
        if hub_file:
            raise LcrunError(model, "--file names a file in a Hub repo; MODEL is already a local file")
        return path
    if model == "demo":
        return demo_gguf()
    if path.is_dir():
        raise LcrunError(model, "a folder, not a GGUF file (convert a checkpoint first: lcrun convert "
                                f"{model} --outtype q8_0)")
    from lcrun import hub, model_ref

    repo_id, quant = model_ref.split_model_ref(model)
    if not model_ref.looks_like_repo_id(repo_id):
        raise LcrunError(model, "no such file (give a .gguf path, `demo`, or a Hub GGUF repo as org/repo:QUANT)")
    if quant and hub_file:
        raise LcrunError(model, f"both :{quant} and --file {hub_file} say which GGUF to run; give one")
    filename = hub_file or model_ref.choose_gguf(repo_id, hub.list_gguf_files(repo_id, revision), quant)
    return hub.download_gguf(repo_id, filename, revision, progress=progress)
