"""The Hugging Face Hub boundary: the only module that imports huggingface_hub, and through its API for everything it
has one for — downloads into the normal Hugging Face cache (snapshot_download, hf_hub_download; never written by
hand), listings (model_info), a checkpoint's safetensors headers without its weights (get_sharded_safetensors_metadata
and get_safetensors_metadata).

One thing has no such API: the header of a GGUF file on the Hub. A safetensors header is an 8-byte length and that
much JSON; a GGUF header holds the whole vocabulary (several MB, of a size known only while parsing), so
`fetch_gguf_header` reads it by range requests that grow until lcrun's GGUF parser (gguf_reader.parse_gguf_header)
has it whole — through huggingface_hub's own HTTP session, so its redirects to the CDN and its header handling are
the library's. The environment (endpoint, cache, offline mode, timeouts) is read at every call (lcrun.hub_settings);
what a reference such as `org/repo:QUANT` names is lcrun.model_ref's."""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from . import hub_settings as settings
from .errors import HubError, HubUnreachable
from .hub_progress import forwarding_bar_class

if TYPE_CHECKING:
    from .gguf_reader import GGUFHeader

# What a checkpoint needs, and nothing else: no .bin/.pth duplicates of the weights, no `original/` folder, no
# consolidated single-file copies (Mistral ships both, which would double the download).
CHECKPOINT_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "*.safetensors",
                       "model.safetensors.index.json")
# huggingface_hub's `*` crosses `/`, so "*/*" is what keeps the download to the repo's top level
IGNORED_PATTERNS = ("*/*", "consolidated*")



def download_checkpoint(repo_id: str, revision: str | None = None, *,
                        progress: Callable[[int, int], None] | None = None) -> tuple[Path, str]:
    """Download the safetensors checkpoint of `repo_id` into the HF cache; returns (snapshot_dir, commit_sha).

    `progress(done, total)` gets bytes, from the download threads; files already in the cache count as done.
    """
    from huggingface_hub import HfApi, get_token, snapshot_download, try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    endpoint = settings.endpoint()
    cache_dir = settings.hub_cache_dir()
    offline = settings.offline()
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
            local_files_only=offline, etag_timeout=settings.etag_timeout(),
            tqdm_class=forwarding_bar_class(progress, total=sum(sizes.values()), initial=cached), **patterns,
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


_GGUF_FIRST_READ = 1 << 20
_GGUF_MAX_HEADER = 64 << 20


def fetch_checkpoint_metadata(repo_id: str, revision: str | None = None) -> RemoteCheckpoint:
    """config.json and every tensor's dtype and shape, from the safetensors headers alone, through huggingface_hub:
    a sharded checkpoint on the main branch in one request (get_sharded_safetensors_metadata: the Hub parses the
    headers), anything else by get_safetensors_metadata (the shard index, then one ranged read of each shard's
    header) pinned to the commit that `revision` resolves to."""
    from huggingface_hub import HfApi, get_token, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, NotASafetensorsRepoError, SafetensorsParsingError

    endpoint = settings.endpoint()
    token = get_token()
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token)):
        _probe(hf_hub_url(repo_id, "config.json", revision=revision, endpoint=endpoint), token)
        config_path = Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=settings.hub_cache_dir(),
                                           endpoint=endpoint, token=token, etag_timeout=settings.etag_timeout()))
        commit = config_path.parent.name  # the cache names snapshot folders by commit
        config = _load_json(repo_id, "config.json", config_path)
        api = HfApi(endpoint=endpoint, token=token)
        try:
            found = _sharded_in_one_request(api, repo_id) if revision in (None, "main") else None
            if found is None:
                with _no_progress_bars():
                    found = api.get_safetensors_metadata(repo_id, revision=commit, **_timeout_for(api))
        except NotASafetensorsRepoError:
            raise HubError(repo_id, "has no safetensors weights (only safetensors checkpoints are supported, "
                                    "not .bin or .pth)") from None
        except SafetensorsParsingError as error:
            raise _unreadable_header(repo_id, str(error)) from None
        except EntryNotFoundError as error:
            shard = unquote(str(error.response.url).rsplit("/", 1)[-1]) if error.response is not None else "a shard"
            raise HubError(repo_id, f"{shard} is listed in model.safetensors.index.json but is not in the "
                                    "repo") from None
        except (ValueError, TypeError) as error:  # an index or a header of the wrong JSON shape
            raise HubError(repo_id, f"malformed model.safetensors.index.json or safetensors header ({error})") from None
    if not found.files_metadata:
        raise HubError(repo_id, "model.safetensors.index.json has no weight_map")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard, header in sorted(found.files_metadata.items()):
        for name, info in header.tensors.items():
            shape = info.shape
            if (not isinstance(info.dtype, str) or not isinstance(shape, list)
                    or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape)):
                raise HubError(repo_id, f"{shard} has a malformed safetensors header (tensor {name!r})")
            tensors[name] = (info.dtype, tuple(shape))
    return RemoteCheckpoint(repo_id=repo_id, commit=commit, config=config, tensors=tensors)


def _sharded_in_one_request(api: Any, repo_id: str) -> Any:
    """Every shard's header of a sharded checkpoint on main, parsed by the Hub; None where this cannot answer (no
    index, an older huggingface_hub, a mirror without this API, a shard the Hub could not parse): then each header is
    read and parsed here."""
    from huggingface_hub.errors import HfHubHTTPError

    if not hasattr(api, "get_sharded_safetensors_metadata"):
        return None
    try:
        return api.get_sharded_safetensors_metadata(repo_id, timeout=settings.download_timeout())
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code in (401, 403):
            raise  # gated, private or a bad token: the same answer the headers would get
        return None


def _unreadable_header(repo_id: str, message: str) -> HubError:
    """huggingface_hub's SafetensorsParsingError ("Failed to parse safetensors header for 'FILE' (…): PROBLEM") as
    lcrun's one line naming the file."""
    match = re.search(r"for '([^']+)' \(.*?\): (.*)$", message)
    shard, problem = (match[1], match[2].split(". ")[0]) if match else ("a safetensors file", message)
    if "too big" in problem or "too small" in problem:
        return HubError(repo_id, f"{shard} is not a valid safetensors file: {problem}")
    return HubError(repo_id, f"{shard} has a malformed safetensors header ({problem})")


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """huggingface_hub draws a tqdm bar over the shards it reads; lcrun reports its own progress."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _timeout_for(api: Any) -> dict[str, float]:
    """The read timeout from the environment now; get_safetensors_metadata takes one from huggingface_hub 1.x's
    later releases on (before, it used the value read at import)."""
    import inspect

    accepts = "timeout" in inspect.signature(api.get_safetensors_metadata).parameters
    return {"timeout": settings.download_timeout()} if accepts else {}


def fetch_gguf_header(repo_id: str, filename: str, revision: str | None = None, *,
                      first_read: int = _GGUF_FIRST_READ, max_header: int = _GGUF_MAX_HEADER) -> GGUFHeader:
    """The header of one GGUF file in a repo (for a split model, call it once per split), read in ranges that
    grow geometrically from `first_read` bytes until the tensor infos are complete; vocabularies make headers
    several MB. A header larger than `max_header` is refused. Parsed by lcrun's one header reader."""
    from huggingface_hub import get_token, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    from .gguf_reader import parse_gguf_header
    from .gguf_values import HeaderError, NeedMoreBytes

    endpoint = settings.endpoint()
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
    offline = settings.offline()
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


def _probe(url: str, token: str | None) -> None:
    """One HEAD request: hf_hub_download retries an unreachable Hub with back-off for ~20 s; this fails at once."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().request("HEAD", url, headers=build_hf_headers(token=token, library_name="lcrun"),
                                     timeout=settings.download_timeout())
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
    with get_session().stream("GET", url, headers=headers, timeout=settings.download_timeout()) as response:
        if response.status_code == 416:  # start is at or past the end of the file
            return b"", _content_range_total(response.headers.get("Content-Range"))
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if response.status_code == 206:
            skip, total = 0, _content_range_total(response.headers.get("Content-Range"))
        else:
            skip, total = start, _int_or_none(response.headers.get("Content-Length"))
        wanted, received = skip + stop - start, 0
        chunks: list[bytes] = []
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


def download_gguf(repo_id: str, filename: str, revision: str | None = None, *,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Download a GGUF (every split of a split set) from a Hub repo into the HF cache; returns the first file."""
    from huggingface_hub import HfApi, get_token, hf_hub_download

    endpoint, cache_dir, offline, token = settings.endpoint(), settings.hub_cache_dir(), settings.offline(), get_token()
    from .model_ref import split_names

    names = split_names(repo_id, filename)
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
            bar = forwarding_bar_class(progress, total=total, initial=done_before) if progress else None
            paths.append(Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                                              endpoint=endpoint, token=token, local_files_only=offline,
                                              etag_timeout=settings.etag_timeout(), tqdm_class=bar)))
            done_before += sizes.get(name, 0)
    if progress is not None and total:
        progress(total, total)
    return paths[0]


def list_gguf_files(repo_id: str, revision: str | None = None) -> list[str]:
    """Every .gguf in a Hub repo (sub-folders included), sorted."""
    from huggingface_hub import HfApi, get_token

    endpoint, token = settings.endpoint(), get_token()
    with _hub_errors(repo_id, revision, endpoint=endpoint, token_sent=bool(token)):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
    return sorted(s.rfilename for s in info.siblings or [] if s.rfilename.lower().endswith(".gguf"))
