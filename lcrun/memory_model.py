"""Memory llama.cpp allocates for a model, computed from its shape before anything is downloaded.

KV cache, output buffer and weights follow llama.cpp's own allocation rules (vendored llama.cpp in llama-cpp-python
0.3.36: `llama_context` pads n_ctx to 256, `llama_kv_cache` holds one K and one V tensor per layer) and match its
figures to the byte. The compute buffer is ggml-alloc's peak over the worst-case graph; it is modelled as the largest
of three phases of a llama-style layer stack and calibrated against llama.cpp on the CPU backend (tests measure it).

All figures are for one context with `n_seq` sequences in separate (non-unified) KV streams, the llama.cpp default.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import gguf

# llama_context pads n_ctx (and n_ctx per sequence) to this many cells; llama_kv_cache_iswa pads the SWA cache too
KV_CELL_PADDING = 256
# ggml's CPU buffer alignment (TENSOR_ALIGNMENT); every tensor in a buffer starts on it
CPU_TENSOR_ALIGNMENT = 32
# llama.cpp rotates quantized K/V with a Hadamard matrix when the head size is a multiple of this
_ATTN_ROT_HEAD_MULTIPLE = 64
_F32 = 4


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int = 0
    swa_layers: tuple[bool, ...] = ()

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv


def _pad(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _quant(type_name: str) -> gguf.GGMLQuantizationType:
    try:
        return gguf.GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {type_name!r}; use f16, q8_0, q4_0, …") from None


def row_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of `n_elements` values of a ggml type (ggml_row_size); n_elements must be whole blocks."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[_quant(type_name)]
    return n_elements // block_size * type_size


def _is_quantized(type_name: str) -> bool:
    return gguf.GGML_QUANT_SIZES[_quant(type_name)][0] > 1


def _kv_fix(role: str, type_k: str, type_v: str) -> str:
    k, v = ("f16", type_v) if role == "K" else (type_k, "f16")
    if role == "K" and _is_quantized(type_v):
        v = "f16"  # quantized types share the 32-value block: V fails the same way
    return k if k == v else f"{k}/{v}"


def parse_kv_type(text: str) -> tuple[str, str]:
    """lcrun's `--kv-type K[/V]` as (K type, V type), lower-cased: one type for both caches, or K and V apart."""
    k, sep, v = text.strip().lower().partition("/")
    if not k or (sep and not v) or "/" in v:
        raise ValueError(f"{text!r} is not a KV cache type such as q8_0, or K/V apart such as q8_0/q4_0")
    return k, v or k


def kv_type_name(type_k: str, type_v: str, separator: str = "/") -> str:
    """The way --kv-type spells a pair: "q8_0" for both caches, "q8_0/q4_0" for K and V apart."""
    return type_k if type_k == type_v else f"{type_k}{separator}{type_v}"


def validate_kv(shape: ModelShape, type_k: str, type_v: str, flash_attn: bool) -> None:
    """Raise ValueError, naming the fix, for a KV cache type llama.cpp would refuse for this model."""
    for role, type_name, head_dim in (("K", type_k, shape.head_dim_k), ("V", type_v, shape.head_dim_v)):
        block_size = gguf.GGML_QUANT_SIZES[_quant(type_name)][0]
        if head_dim % block_size:
            raise ValueError(
                f"{role} cache type {type_name} packs {block_size} values per block, but this model's head size is "
                f"{head_dim}; use --kv-type {_kv_fix(role, type_k, type_v)}"
            )
    if _is_quantized(type_v) and not flash_attn:
        raise ValueError(f"a quantized V cache ({type_v}) needs flash attention; enable it or use a f16 V cache")


def kv_cells(
    shape: ModelShape, *, n_ctx: int, n_seq: int = 1, n_ubatch: int = 512, swa: bool = False, swa_full: bool = True
) -> int:
    """Cells in the KV cache (all streams): llama_context's padded n_ctx, or the SWA cache's size for SWA layers."""
    n_ctx_seq = _pad(n_ctx, KV_CELL_PADDING)
    if n_seq > 1:
        n_ctx_seq = _pad(n_ctx_seq // n_seq, KV_CELL_PADDING)
    if swa and not swa_full:
        n_ctx_seq = _pad(min(n_ctx_seq, shape.n_swa + n_ubatch), KV_CELL_PADDING)
    return n_ctx_seq * n_seq


def kv_cache_bytes(
    shape: ModelShape,
    *,
    n_ctx: int,
    n_seq: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    n_ubatch: int = 512,
    swa_full: bool = True,
) -> int:
    """Bytes of llama.cpp's KV cache buffer: one K and one V tensor of n_cells rows per layer.

    `swa_full` is llama-cpp-python's default: sliding-window layers get a full-size cache."""
    return sum(kv_cache_bytes_per_layer(shape, n_ctx=n_ctx, n_seq=n_seq, type_k=type_k, type_v=type_v,
                                        flash_attn=flash_attn, n_ubatch=n_ubatch, swa_full=swa_full))


def kv_cache_bytes_per_layer(
    shape: ModelShape,
    *,
    n_ctx: int,
    n_seq: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    n_ubatch: int = 512,
    swa_full: bool = True,
) -> list[int]:
    """Each layer's part of the KV cache: what goes with the layer to the device that holds it."""
    validate_kv(shape, type_k, type_v, flash_attn)
    per_cell = row_bytes(type_k, shape.n_embd_k_gqa) + row_bytes(type_v, shape.n_embd_v_gqa)
    swa_layers = shape.swa_layers or (False,) * shape.n_layer
    return [kv_cells(shape, n_ctx=n_ctx, n_seq=n_seq, n_ubatch=n_ubatch, swa=is_swa and shape.n_swa > 0,
                     swa_full=swa_full) * per_cell for is_swa in swa_layers]


def output_buffer_bytes(
    shape: ModelShape, *, n_ctx: int, n_batch: int, n_seq: int = 1, all_logits: bool = False
) -> int:
    """Bytes of the host output buffer: float logits for every output row.

    At context creation llama.cpp reserves one row per sequence; a batch that asks for every token's logits grows it
    to n_batch rows (`all_logits`). n_ctx does not enter: the buffer never holds more than one batch."""
    n_outputs = max(n_batch if all_logits else 1, n_seq)
    return shape.n_vocab * n_outputs * _F32


def compute_buffer_bytes(
    shape: ModelShape,
    *,
    n_ctx: int,
    n_ubatch: int,
    flash_attn: bool,
    type_k: str = "f16",
    type_v: str = "f16",
    device: str = "cpu",
    layers: bool = True,
    output_layer: bool = True,
    input_layer: bool = True,
    pipeline_copies: int = 1,
) -> int:
    """Peak of llama.cpp's compute buffer for the worst-case (n_ubatch tokens, full KV) graph of a llama-style model.

    The buffer holds the KQ mask (an input, live across every layer: f16 with flash attention, f32 without) plus the
    largest of three phases, in floats per token of the ubatch (E = n_embd, F = n_ff, kv = n_head_kv × (head_dim_k +
    head_dim_v), the K and V of one token):

      attention, no flash attention   the score matrix n_kv × n_head, plus 5E + kv of Q/K/V and residuals
      attention, flash attention      4E + kv (never the largest on real models)
      feed-forward                    gate, up and their product: 3F, plus 4E of residuals and holes
      output                          the logits n_vocab (reserved for every token), plus 2E — the mask has been
                                      freed by then

    A quantized K is rotated (a Hadamard matmul) when its head size is a multiple of 64, which moves the allocator's
    holes by about ±E: the feed-forward phase then takes 3.75E (3.5E without flash attention) and the output phase
    2.5E. Without flash attention the output phase takes 2.5E.

    Measured against llama.cpp 0.3.36 (CPU; 900 cases, n_ctx 512–33000, n_ubatch 128/512, n_ff = 2.75–3.5 n_embd):
    flash attention with a f16 K within 0.2 %; without flash attention within 1.4 % beyond n_ctx 512 and −6…+5 % at
    512; a quantized K −4…+4.5 %. Shapes with n_ff ≤ 2 n_embd (unlike released models) fragment differently and
    can be off by up to 28 %.

    Split over several devices (layers on this machine's CPU and on RPC workers), each device's buffer holds the
    phases of the part it runs: `layers` (it holds repeating layers: the attention and feed-forward phases),
    `output_layer` (the output phase, with n_vocab + E when the input layer is elsewhere), `input_layer` (the CPU: the
    token embeddings). A device holding none of these (the CPU when every layer is offloaded) keeps the mask and
    2E (3E without flash attention) per token. With pipeline parallelism (every layer offloaded over more than one
    device) ggml's scheduler keeps `pipeline_copies` (GGML_SCHED_MAX_COPIES, 4) copies of each part's inputs: each
    device gains (copies - 1) x (mask + E per token), the output device another mask + 5E per token. These split
    rules are measured on CPU devices over loopback RPC (hidden 1024, ffn 3584, vocab 128256, n_ctx 4096 and 16384,
    flash attention on and off): the CPU's buffer, a device with the output layer alone and the pipeline extras
    within 16 KiB; a worker holding only repeating layers comes out up to one mask + 2E per token (8 MiB there) too
    high, as ggml's allocator packs a short run of layers tighter."""
    if device != "cpu":
        raise ValueError(f"the compute buffer is calibrated for the CPU backend only, not {device!r}")
    if not (layers and output_layer and input_layer):
        return _split_compute_bytes(shape, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k,
                                    type_v=type_v, layers=layers, output_layer=output_layer,
                                    pipeline_copies=pipeline_copies)
    n_kv = _pad(n_ctx, KV_CELL_PADDING)
    E, F, per_token = shape.n_embd, shape.n_ff, n_ubatch * _F32
    kv = shape.n_embd_k_gqa + shape.n_embd_v_gqa
    rotated_k = _is_quantized(type_k) and shape.head_dim_k % _ATTN_ROT_HEAD_MULTIPLE == 0
    if flash_attn:
        mask = n_kv * n_ubatch * 2
        attention = mask + (4 * E + kv) * per_token
        output_extra = 2.5 if rotated_k else 2.0
    else:
        mask = n_kv * n_ubatch * _F32
        attention = mask + n_kv * n_ubatch * shape.n_head * _F32 + (5 * E + kv) * per_token
        output_extra = 2.5
    residual_width = 4.0
    if rotated_k:
        residual_width = 3.75 if flash_attn else 3.5
    ffn = mask + (3 * F + residual_width * E) * per_token
    output = (shape.n_vocab + output_extra * E) * per_token
    return int(max(attention, ffn, output))


def _split_compute_bytes(shape: ModelShape, *, n_ctx: int, n_ubatch: int, flash_attn: bool, type_k: str, type_v: str,
                         layers: bool, output_layer: bool, pipeline_copies: int) -> int:
    E, per_token = shape.n_embd, n_ubatch * _F32
    mask = _pad(n_ctx, KV_CELL_PADDING) * n_ubatch * (2 if flash_attn else _F32)
    phases = []
    if layers:
        whole = compute_buffer_bytes(shape, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k,
                                     type_v=type_v)
        without_output = compute_buffer_bytes(replace(shape, n_vocab=0), n_ctx=n_ctx, n_ubatch=n_ubatch,
                                              flash_attn=flash_attn, type_k=type_k, type_v=type_v)
        phases.append(min(whole, without_output))
    if output_layer:
        phases.append((shape.n_vocab + E) * per_token)
    if not phases:
        phases.append(mask + (2 if flash_attn else 3) * E * per_token)
    extra = 0
    if pipeline_copies > 1:
        extra = (pipeline_copies - 1) * (mask + E * per_token) + (mask + 5 * E * per_token if output_layer else 0)
    return int(max(phases)) + extra


def weights_bytes(tensor_nbytes: Iterable[int], *, alignment: int = CPU_TENSOR_ALIGNMENT) -> int:
    """Bytes of the model buffer that holds these tensors (their GGUF sizes), each aligned as ggml-alloc does."""
    return sum(_pad(n, alignment) for n in tensor_nbytes)
