"""The Hugging Face Hub boundary: the only module that imports huggingface_hub.

Checkpoints go into the normal Hugging Face cache and are read back through huggingface_hub, never written by hand.
huggingface_hub reads its environment once, at its own import; the settings that matter here (endpoint, cache,
offline mode, token, timeouts) are read again from the environment at every call, so the caller's environment wins.
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HubError, HubUnreachable

if TYPE_CHECKING:
    from .gguf_header import GGUFHeader

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
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token), cache_may_answer=True):
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
    snapshot = Path(folder)
    _require_safetensors(repo_id, (path.name for path in snapshot.iterdir()))
    if progress is not None and sizes:
        progress(sum(sizes.values()), sum(sizes.values()))
    return snapshot, snapshot.name  # the cache names snapshot folders by commit


@dataclass
class RemoteCheckpoint:
    """What the memory estimator needs from a safetensors repo, read without downloading any weights."""
    repo_id: str
    commit: str
    config: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)


# safetensors refuses headers over 100 MB (MAX_HEADER_SIZE in its Rust crate); a larger length is corruption
_SAFETENSORS_MAX_HEADER = 100_000_000
_GGUF_FIRST_READ = 1 << 20
_GGUF_MAX_HEADER = 64 << 20


def fetch_checkpoint_metadata(repo_id: str, revision: str | None = None) -> RemoteCheckpoint:
    """config.json and every tensor's dtype and shape, from the safetensors headers alone (two small range
    requests per shard), pinned to the commit that `revision` resolves to."""
    from huggingface_hub import get_token, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    endpoint = _endpoint()
    token = get_token()
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token)):
        download = {"revision": revision, "cache_dir": _hub_cache_dir(), "endpoint": endpoint, "token": token,
                    "etag_timeout": _etag_timeout()}
        _probe(hf_hub_url(repo_id, "config.json", revision=revision, endpoint=endpoint), token)
        config_path = Path(hf_hub_download(repo_id, "config.json", **download))
        commit = config_path.parent.name  # the cache names snapshot folders by commit
        config = _load_json(repo_id, "config.json", config_path)
        download["revision"] = commit
        try:
            index = _load_json(repo_id, "model.safetensors.index.json",
                               Path(hf_hub_download(repo_id, "model.safetensors.index.json", **download)))
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HubError(repo_id, "model.safetensors.index.json has no weight_map")
            shards = sorted(set(weight_map.values()))
        except EntryNotFoundError:
            shards = ["model.safetensors"]
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        for shard in shards:
            url = hf_hub_url(repo_id, shard, revision=commit, endpoint=endpoint)
            try:
                tensors.update(_safetensors_header(repo_id, shard, url, token))
            except EntryNotFoundError:
                if shards == ["model.safetensors"]:
                    raise HubError(repo_id, "has no safetensors weights (only safetensors checkpoints are "
                                            "supported, not .bin or .pth)") from None
                raise HubError(repo_id, f"{shard} is listed in model.safetensors.index.json but is not in "
                                        "the repo") from None
    return RemoteCheckpoint(repo_id=repo_id, commit=commit, config=config, tensors=tensors)


def fetch_gguf_header(repo_id: str, filename: str, revision: str | None = None, *,
                      first_read: int = _GGUF_FIRST_READ, max_header: int = _GGUF_MAX_HEADER) -> GGUFHeader:
    """The header of one GGUF file in a repo (for a split model, call it once per split), read in ranges that
    grow geometrically from `first_read` bytes until the tensor infos are complete; vocabularies make headers
    several MB. A header larger than `max_header` is refused. Parsed by lcrun's one header reader."""
    from huggingface_hub import get_token, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    from .gguf_header import HeaderError, NeedMoreBytes, parse_gguf_header

    endpoint = _endpoint()
    token = get_token()
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token)):
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
        buffer = b""
        want = min(first_read, max_header)
        file_size: int | None = None
        while True:
            try:
                chunk, file_size = _read_range(url, len(buffer), want, token)
            except EntryNotFoundError:
                raise HubError(repo_id, f"no file {filename!r} in this repo") from None
            buffer += chunk
            whole = file_size is not None and len(buffer) >= file_size
            try:
                return parse_gguf_header(buffer, f"{repo_id}/{filename}", complete=whole, file_size=file_size)
            except NeedMoreBytes as more:
                if len(buffer) < want:
                    raise HubError(repo_id, f"{filename} is truncated: the file ends inside its GGUF header "
                                            f"({len(buffer)} bytes)") from None
                if want >= max_header or more.at_least > max_header:
                    raise HubError(repo_id, f"{filename}: the GGUF header is larger than {max_header >> 20} MiB; "
                                            "the file is probably corrupt") from None
                want = min(max(2 * len(buffer), more.at_least), max_header)
            except HeaderError as malformed:
                if whole and malformed.problem.startswith("truncated"):
                    raise HubError(repo_id, f"{filename} is truncated: {malformed.problem}") from None
                if malformed.problem.startswith("not a GGUF file"):
                    raise HubError(repo_id, f"{filename} is {malformed.problem}") from None
                raise HubError(repo_id, f"{filename} is not a valid GGUF file: {malformed.problem}") from None


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, *, endpoint: str, token_sent: bool,
                cache_may_answer: bool = False) -> Iterator[None]:
    """Map the Hub's failures to one-line HubErrors. Offline, metadata reads fail at once; downloads
    (`cache_may_answer`) go on, since the local cache may hold the files."""
    offline = _offline()
    if offline and not cache_may_answer:
        raise HubUnreachable(repo_id, "HF_HUB_OFFLINE is set, so the Hub cannot be reached to read the model's metadata; "
                                "give a local checkpoint directory instead")
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        mapped = _hub_error(repo_id, revision, error, offline=offline, endpoint=endpoint, token_sent=token_sent)
        if mapped is None:
            raise
        raise mapped from error


def _load_json(repo_id: str, filename: str, path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(repo_id, f"{filename} is not valid JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise HubError(repo_id, f"{filename} is not a JSON object")
    return loaded


def _safetensors_header(repo_id: str, filename: str, url: str,
                        token: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    prefix, _ = _read_range(url, 0, 8, token)
    if len(prefix) < 8:
        raise HubError(repo_id, f"{filename} is truncated: {len(prefix)} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if not 2 <= length <= _SAFETENSORS_MAX_HEADER:
        raise HubError(repo_id, f"{filename} is not a valid safetensors file: header length {length}")
    raw, _ = _read_range(url, 8, 8 + length, token)
    if len(raw) < length:
        raise HubError(repo_id, f"{filename} is truncated: the file ends after {len(raw)} of its {length} "
                                "safetensors header bytes")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(repo_id, f"{filename} has a malformed safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise HubError(repo_id, f"{filename} has a malformed safetensors header (not a JSON object)")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (not isinstance(dtype, str) or not isinstance(shape, list)
                or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape)):
            raise HubError(repo_id, f"{filename} has a malformed safetensors header (tensor {name!r})")
        tensors[name] = (dtype, tuple(shape))
    return tensors


def _probe(url: str, token: str | None) -> None:
    """One HEAD request: hf_hub_download retries an unreachable Hub with back-off for ~20 s; this fails at once."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().request("HEAD", url, headers=build_hf_headers(token=token, library_name="lcrun"),
                                     timeout=_download_timeout())
    if response.status_code >= 400:
        hf_raise_for_status(response)


def _read_range(url: str, start: int, stop: int, token: str | None) -> tuple[bytes, int | None]:
    """Bytes [start, stop) of a Hub file, and the file's size when the server says it.

    Through huggingface_hub's own client: it follows the Hub's redirect to its CDN and, like httpx, drops the
    Authorization header when the redirect leaves the Hub's origin. A server that ignores Range is read only as
    far as needed.
    """
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(token=token, library_name="lcrun"), "Range": f"bytes={start}-{stop - 1}"}
    with get_session().stream("GET", url, headers=headers, timeout=_download_timeout()) as response:
        if response.status_code == 416:  # start is at or past the end of the file
            return b"", _content_range_total(response.headers.get("Content-Range"))
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if response.status_code == 206:
            skip, total = 0, _content_range_total(response.headers.get("Content-Range"))
        else:
            skip, total = start, _int_or_none(response.headers.get("Content-Length"))
        wanted = skip + stop - start
        chunks: list[bytes] = []
        received = 0
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            received += len(chunk)
            if received >= wanted:
                break
    return b"".join(chunks)[skip:wanted], total


def _content_range_total(value: str | None) -> int | None:
    return _int_or_none((value or "").rpartition("/")[2])


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _env_seconds(name: str, default: float = 10.0) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def _download_timeout() -> float:
    return _env_seconds("HF_HUB_DOWNLOAD_TIMEOUT")


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
        return HubUnreachable(repo_id, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so the Hub cannot "
                                 "be reached; give a local checkpoint directory instead")
    return HubUnreachable(repo_id, f"the Hugging Face Hub ({endpoint}) cannot be reached; check the connection, "
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
    return _env_seconds("HF_HUB_ETAG_TIMEOUT")


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


def gguf_split_names(filename: str) -> list[str]:
    """Every file of the split set `filename` belongs to (NAME-0000i-of-0000N.gguf), or just `filename`."""
    import re

    match = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", filename)
    if not match:
        return [filename]
    return [f"{match.group(1)}-{i:05d}-of-{match.group(3)}.gguf" for i in range(1, int(match.group(3)) + 1)]


def download_gguf(repo_id: str, filename: str, revision: str | None = None, *,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Download a GGUF (every split of a split set) from a Hub repo into the HF cache; returns the first file."""
    from huggingface_hub import HfApi, get_token, hf_hub_download

    endpoint, cache_dir, offline, token = _endpoint(), _hub_cache_dir(), _offline(), get_token()
    names = gguf_split_names(filename)
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token), cache_may_answer=True):
        sizes: dict[str, int] = {}
        if not offline:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
            sizes = {s.rfilename: s.size or 0 for s in info.siblings or [] if s.rfilename in names}
            missing = [n for n in names if n not in sizes]
            if missing:
                ggufs = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".gguf"))
                hint = f"; it has {', '.join(ggufs[:6])}" if ggufs else "; it has no .gguf files"
                raise HubError(repo_id, f"no file {missing[0]} in the repo{hint}")
        total, done_before = sum(sizes.values()), 0
        paths = []
        for name in names:
            bar = _progress_bar_class(progress, total=total, initial=done_before) if progress else None
            paths.append(Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                                              endpoint=endpoint, token=token, local_files_only=offline,
                                              etag_timeout=_etag_timeout(), tqdm_class=bar)))
            done_before += sizes.get(name, 0)
    if progress is not None and total:
        progress(total, total)
    return paths[0]


# llama.cpp's -hf form: org/repo[:QUANT]; a quant name as GGUF file names spell it (Q4_K_M, IQ4_XS, q8_0, F16, BF16, …)
_QUANT_SUFFIX = re.compile(r"^(?P<repo>[^:]+):(?P<quant>[A-Za-z0-9_]+)$")
_QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])((?:I?Q\d+_[A-Z0-9_]*?|Q\d+_\d|Q\d+|BF16|F16|F32|TQ\d_\d|MXFP4))"
                            r"(?=[-.](?:\d{5}-of-\d{5}\.)?gguf$|[-.])", re.IGNORECASE)


def split_model_ref(text: str) -> tuple[str, str | None]:
    """("org/repo", "QUANT") for llama.cpp's `org/repo:QUANT`, ("org/repo", None) without a quant; anything else is
    returned whole, with no quant."""
    match = _QUANT_SUFFIX.match(text)
    if match and looks_like_repo_id(match["repo"]):
        return match["repo"], match["quant"]
    return text, None


def _quant_of(filename: str) -> str | None:
    """The quant a GGUF file name states (the last one, as in `Model-8B-Instruct-Q4_K_M.gguf`), upper-cased."""
    found = _QUANT_IN_NAME.findall(filename.rsplit("/", 1)[-1])
    return found[-1].upper() if found else None


def _first_of_split_set(filename: str) -> bool:
    match = re.search(r"-(\d{5})-of-\d{5}\.gguf$", filename)
    return match is None or match[1] == "00001"


def list_gguf_files(repo_id: str, revision: str | None = None) -> list[str]:
    """Every .gguf in a Hub repo (sub-folders included), sorted."""
    from huggingface_hub import HfApi, get_token

    endpoint, token = _endpoint(), get_token()
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token)):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
    return sorted(s.rfilename for s in info.siblings or [] if s.rfilename.lower().endswith(".gguf"))


def choose_gguf(repo_id: str, files: list[str], quant: str | None) -> str:
    """The GGUF (the first file of a split set) that `org/repo[:QUANT]` means among `files`, or a one-line HubError
    listing what the repo has."""
    # the first file of each split set; vision projectors (mmproj) are not models to chat with
    models = [f for f in files if f.lower().endswith(".gguf") and _first_of_split_set(f) and "mmproj" not in f.lower()]
    if not models:
        raise HubError(repo_id, "has no .gguf files (for a safetensors repo, run `lcrun convert` first)")
    quants = sorted({q for q in (_quant_of(f) for f in models) if q})
    if quant is None:
        if len(models) == 1:
            return models[0]
        raise HubError(repo_id, f"holds {len(models)} GGUFs; pick one with {repo_id}:QUANT "
                                f"({', '.join(quants) or ', '.join(models[:8])})")
    chosen = [f for f in models if _quant_of(f) == quant.upper()]
    if not chosen:
        raise HubError(repo_id, f"has no {quant} GGUF; it has {', '.join(quants) or ', '.join(models[:8])}")
    if len(chosen) > 1:
        raise HubError(repo_id, f"has {len(chosen)} {quant} GGUFs ({', '.join(chosen[:4])}); "
                                "give the file's path instead")
    return chosen[0]


# What counting tokens for a safetensors repo needs: the tokenizer and the files the converter reads it with
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


def download_tokenizer_files(repo_id: str, revision: str | None = None) -> Path:
    """A repo's tokenizer files alone (no weights) into the HF cache; returns the snapshot folder holding them.
    tokenizer.json and config.json are required, the others are read when the repo has them."""
    from huggingface_hub import get_token, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    endpoint, token = _endpoint(), get_token()
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token), cache_may_answer=True):
        download = {"cache_dir": _hub_cache_dir(), "endpoint": endpoint, "token": token,
                    "local_files_only": _offline(), "etag_timeout": _etag_timeout()}
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
