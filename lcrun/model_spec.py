"""What the estimator needs to know about a model, from whatever the user has: a built-in profile, a local HF
checkpoint folder, a local GGUF (splits included), or a Hub repo (config and safetensors headers only)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HubError, HubUnreachable, LcrunError

if TYPE_CHECKING:
    from lcrun.convert.arch import ModelAdapter

    from .gguf_reader import GGUFHeader
    from .gguf_split import GGUFSet


@dataclass
class ModelSpec:
    name: str
    source: str                                        # "profile", "checkpoint", "gguf", "hub"
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tensors: list[tuple[str, tuple[int, ...]]]         # GGUF names and numpy-order shapes
    file_tensor_bytes: dict[str, int] | None = None    # a GGUF's exact tensor sizes (then the quant is fixed)
    file_type: str | None = None
    notes: list[str] = field(default_factory=list)
    rope_theta: float | None = None                    # as the file or config says (for override warnings)
    rope_scaling: str | None = None
    vocab_header: GGUFHeader | None = None             # a Hub GGUF's header: its tokenizer, without a second fetch


def _from_adapter(adapter: ModelAdapter, name: str, source: str) -> ModelSpec:
    return ModelSpec(name=name, source=source, arch=adapter.arch_name, n_layer=adapter.n_layer, n_embd=adapter.hidden,
                     n_head=adapter.n_head, n_head_kv=adapter.n_head_kv, head_dim=adapter.head_dim, n_ff=adapter.ffn,
                     n_vocab=adapter.vocab_size, n_ctx_train=adapter.context_length, tensors=adapter.gguf_tensors())


def spec_from_config(config: dict[str, Any], where: str, name: str, source: str) -> ModelSpec:
    from lcrun.convert.arch import adapter_for  # the converter's adapters: not needed for a GGUF's spec

    return _from_adapter(adapter_for(config, Path(where)), name, source)


def spec_from_checkpoint_dir(model_dir: Path) -> ModelSpec:
    from lcrun.convert.convert import read_config
    from lcrun.convert.planning import plan_checkpoint

    config, path = read_config(model_dir)
    spec = spec_from_config(config, str(path), model_dir.name, "checkpoint")
    quantized = config.get("quantization_config") or config.get("compression_config")
    if quantized or (model_dir / "hf_quant_config.json").is_file():
        _fix_quantization(spec, plan_checkpoint(model_dir))
    return spec


def _fix_quantization(spec: ModelSpec, plan: Any) -> None:
    """A checkpoint whose 4-/8-bit weights `lcrun convert` carries as they are (NVFP4, MXFP4, int4 -> Q4_0/Q4_1):
    its GGUF's size is fixed, like a GGUF file's (lcrun.convert.planning)."""
    from lcrun.convert.planning import carries_quantized

    if not carries_quantized(plan):
        return
    sizes = plan.sizes()
    spec.tensors = [(name, shape) for name, shape, _, _ in sizes]
    spec.file_tensor_bytes = {name: nbytes for name, _, _, nbytes in sizes}
    spec.file_type = plan.outtype.upper()
    by_type: dict[str, int] = {}
    for _, _, qtype, nbytes in sizes:
        by_type[qtype.name] = by_type.get(qtype.name, 0) + nbytes
    mix = ", ".join(f"{t} {b / 2**30:.2f} GiB" for t, b in sorted(by_type.items(), key=lambda kv: -kv[1]))
    spec.notes.append(f"lcrun convert keeps its quantization: {mix}")


def spec_from_gguf(path: Path, gguf_set: GGUFSet | None = None) -> ModelSpec:
    """Exact tensor sizes from the file (all splits); shapes and hyper-parameters from its metadata. Pass `gguf_set`
    when the headers are already read (each command reads a file once)."""
    from .gguf_split import read_gguf_set

    files = gguf_set or read_gguf_set(path)  # validates the file (and its splits) with one-line errors
    return _spec_from_headers([h for _, h in files.headers], files.meta, path.stem, str(path))


def _spec_from_headers(headers: list[GGUFHeader], meta: GGUFHeader, fallback_name: str, where: str) -> ModelSpec:
    from .gguf_inspect import file_type_name

    fields: dict[str, Any] = {}
    for header in headers:
        for key, value in header.fields.items():
            if not key.startswith("tokenizer.ggml."):
                fields.setdefault(key, value)
    tensors = [(t.name, t.shape, t.n_bytes) for header in headers for t in header.tensors]
    name = meta.get("general.name")
    return _spec_from_gguf_metadata(fields, tensors, name if isinstance(name, str) and name else fallback_name, where,
                                    file_type_name(meta.get("general.file_type")))


def _spec_from_gguf_metadata(fields: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], int]], name: str,
                             where: str, file_type: str | None) -> ModelSpec:
    arch = fields.get("general.architecture")
    if not arch:
        raise LcrunError(where, "no general.architecture in the GGUF metadata")

    def key(suffix: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{suffix}", default)

    try:
        n_head = int(key("attention.head_count"))
        n_embd = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", key("rope.dimension_count", n_embd // n_head)))
        n_vocab = int(key("vocab_size", 0) or next((s[0] for n, s, _ in tensors if n == "token_embd.weight"), 0))
        return ModelSpec(name=name, source="gguf", arch=arch, n_layer=int(key("block_count")), n_embd=n_embd,
                         n_head=n_head, n_head_kv=int(key("attention.head_count_kv", n_head)), head_dim=head_dim,
                         n_ff=int(key("feed_forward_length")), n_vocab=n_vocab,
                         n_ctx_train=int(key("context_length")), tensors=[(n, s) for n, s, _ in tensors],
                         file_tensor_bytes={n: b for n, _, b in tensors}, file_type=file_type,
                         rope_theta=_float_or_none(key("rope.freq_base")), rope_scaling=key("rope.scaling.type"))
    except (TypeError, ValueError) as exc:
        raise LcrunError(where, f"GGUF metadata lacks the {arch} hyper-parameters an estimate needs ({exc})") from None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def spec_from_profile(text: str) -> ModelSpec | None:
    from lcrun.models import find_profile

    profile = find_profile(text)
    if profile is None:
        return None
    return spec_from_config(profile.config, f"<profile {profile.name}>", profile.repo_id, "profile")


def resolve_model(text: str, *, revision: str | None = None, gguf_file: str | None = None) -> ModelSpec:
    """A local GGUF or checkpoint folder, a built-in profile, or a Hub repo: `org/repo` (a safetensors checkpoint,
    or a GGUF repo's only file), `org/repo:QUANT` (that quant's GGUF, llama.cpp's -hf form). Falls back to a matching
    profile, with a note, when the Hub cannot be reached."""
    path = Path(text).expanduser()
    if path.is_file():
        return spec_from_gguf(path)
    if path.is_dir():
        return spec_from_checkpoint_dir(path)
    if text == "demo":
        from lcrun.models import demo_checkpoint

        spec = spec_from_checkpoint_dir(demo_checkpoint())
        spec.name = "demo"
        return spec
    from . import hub, model_ref

    repo_id, quant = model_ref.split_model_ref(text)
    profile = spec_from_profile(repo_id)
    if not model_ref.looks_like_repo_id(repo_id):
        if profile is not None:
            profile.notes.append("built-in profile")
            return profile
        raise LcrunError(text, "no such file, folder or built-in profile, and not a Hub repo id (see `lcrun models`)")
    if quant and gguf_file:
        raise LcrunError(text, f"both :{quant} and --file {gguf_file} say which GGUF to read; give one")
    try:
        if gguf_file or quant:
            filename = gguf_file or model_ref.choose_gguf(repo_id, hub.list_gguf_files(repo_id, revision), quant)
            return _spec_from_remote_gguf(repo_id, filename, revision)
        try:
            remote = hub.fetch_checkpoint_metadata(repo_id, revision)
        except HubUnreachable:
            raise
        except HubError:  # no config.json or no safetensors: a GGUF repo, if it holds GGUFs
            ggufs = hub.list_gguf_files(repo_id, revision)
            if not ggufs:
                raise
            return _spec_from_remote_gguf(repo_id, model_ref.choose_gguf(repo_id, ggufs, None), revision)
    except HubUnreachable as exc:
        if profile is None:
            raise
        profile.notes.append(f"the Hub could not be reached ({exc.problem}); using lcrun's built-in profile")
        return profile
    spec = spec_from_config(remote.config, f"{repo_id}/config.json", repo_id, "hub")
    spec.notes.append(f"config and safetensors headers of {repo_id}@{remote.commit[:12]} (no weights downloaded)")
    if _quantized_headers(remote.config, remote.tensors):
        from lcrun.convert.planning import plan_from_headers

        _fix_quantization(spec, plan_from_headers(remote.config, remote.tensors, Path(f"{repo_id}/config.json")))
    return spec


def _quantized_headers(config: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]]) -> bool:
    # ModelOpt's older uploads declare NVFP4 only in hf_quant_config.json; their weight_scale_2 tensors say it too
    return bool(config.get("quantization_config") or config.get("compression_config")
                or any(name.endswith(".weight_scale_2") for name in tensors))


def _spec_from_remote_gguf(repo_id: str, filename: str, revision: str | None) -> ModelSpec:
    """A GGUF on the Hub, from its header alone (range requests); split sets are read split by split."""
    from . import hub
    from .model_ref import split_names

    headers = [hub.fetch_gguf_header(repo_id, name, revision) for name in split_names(repo_id, filename)]
    where = f"{repo_id}/{filename}"
    spec = _spec_from_headers(headers, headers[0], where, where)
    spec.source = "hub"
    spec.vocab_header = headers[0]
    spec.notes.append(f"GGUF header of {repo_id}/{filename} read by range requests (no weights downloaded)")
    return spec
