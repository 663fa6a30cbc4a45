"""The memory estimate against what llama.cpp itself allocates.

Small llama GGUF files (tests/fixtures/memory_cases.py: F16 weights, a byte-level BPE vocab so the logits matter) are
loaded by llama.cpp in its `no_alloc` mode, which lays out every buffer without allocating it;
lcrun.engine.allocations reads the sizes, in bytes, from llama.cpp's own memory breakdown. KV cache and weights must
match to the byte; the compute buffer, an allocator's peak, must be within the tolerance its model documents."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from lcrun.engine.allocations import breakdown_supported, measure_allocations
from lcrun.memory_model import (
    ModelShape,
    compute_buffer_bytes,
    kv_cache_bytes,
    output_buffer_bytes,
    validate_kv,
    weights_bytes,
)
from tests.fixtures.memory_cases import file_weights_bytes, memory_cases, write_memory_models

GiB = 1024**3
MiB = 1024**2


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelShape, Path]]:
    return write_memory_models(tmp_path_factory.mktemp("memory_models"))


def _compute_tolerance(flash_attn: bool, type_k: str) -> float:
    # the documented error of compute_buffer_bytes: exact with flash attention and a f16 K; otherwise ggml-alloc's
    # holes move by about ±n_embd per token
    return 0.002 if flash_attn and type_k == "f16" else 0.05


@pytest.mark.parametrize(("name", "n_ctx", "n_ubatch", "flash_attn", "type_k", "type_v"), memory_cases())
def test_estimate_matches_llama_cpp(
    models: dict[str, tuple[ModelShape, Path]], name: str, n_ctx: int, n_ubatch: int, flash_attn: bool, type_k: str,
    type_v: str,
) -> None:
    shape, path = models[name]
    measured = measure_allocations(
        path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_batch=512, type_k=type_k, type_v=type_v, flash_attn=flash_attn
    )
    kv = kv_cache_bytes(shape, n_ctx=n_ctx, type_k=type_k, type_v=type_v, flash_attn=flash_attn)
    if breakdown_supported():
        assert measured.exact and kv == measured.kv_bytes
    else:  # elsewhere llama.cpp's log is all there is: 0.01 MiB
        assert abs(kv - measured.kv_bytes) <= 0.005 * MiB

    estimate = compute_buffer_bytes(
        shape, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, type_k=type_k, type_v=type_v
    )
    assert estimate == pytest.approx(measured.compute_bytes, rel=_compute_tolerance(flash_attn, type_k))

    # llama.cpp logs the output buffer only in MiB with two decimals
    output = output_buffer_bytes(shape, n_ctx=n_ctx, n_batch=512)
    assert abs(output - measured.output_bytes) <= 0.005 * MiB

    # the bar for the whole: within 3 %
    weights = file_weights_bytes(path)
    total = weights + kv_cache_bytes(shape, n_ctx=n_ctx, type_k=type_k, type_v=type_v, flash_attn=flash_attn)
    total += estimate + output
    measured_total = measured.weights_bytes + measured.kv_bytes + measured.compute_bytes + measured.output_bytes
    assert total == pytest.approx(measured_total, rel=0.03)


def test_weights_match_llama_cpp(models: dict[str, tuple[ModelShape, Path]]) -> None:
    for shape, path in models.values():
        tensors = gguf.GGUFReader(path).tensors
        measured = measure_allocations(path, n_ctx=512, n_ubatch=512, n_batch=512)
        assert weights_bytes(int(t.n_bytes) for t in tensors) == measured.weights_bytes


def test_logged_sizes_agree_with_the_breakdown(models: dict[str, tuple[ModelShape, Path]]) -> None:
    # the log path, which every platform but x86-64 Linux with libstdc++ takes, against the exact breakdown
    shape, path = models["d64-gqa4-4layers"]
    settings = dict(n_ctx=33000, n_ubatch=512, n_batch=512, flash_attn=False)
    logged = measure_allocations(path, use_breakdown=False, **settings)
    assert not logged.exact
    assert abs(logged.kv_bytes - kv_cache_bytes(shape, n_ctx=33000, flash_attn=False)) <= 0.005 * MiB
    assert logged.weights_bytes > 0 and logged.compute_bytes > 0 and logged.output_bytes > 0
    if not breakdown_supported():
        return
    exact = measure_allocations(path, **settings)
    assert exact.exact
    for kind in ("weights", "kv", "compute"):
        assert getattr(exact, kind).keys() == getattr(logged, kind).keys() == {"CPU"}
        assert abs(getattr(exact, f"{kind}_bytes") - getattr(logged, f"{kind}_bytes")) <= 0.005 * MiB


def test_breakdown_is_read_only_where_its_calling_convention_holds() -> None:
    import platform
    import sys

    expected = sys.platform.startswith("linux") and platform.machine() == "x86_64"
    assert breakdown_supported() == (expected and "libstdc++" in Path("/proc/self/maps").read_text())


def test_several_sequences_get_one_padded_stream_each(models: dict[str, tuple[ModelShape, Path]]) -> None:
    shape, path = models["d128-gqa4"]
    for n_ctx in (4096, 5000):
        measured = measure_allocations(path, n_ctx=n_ctx, n_ubatch=512, n_batch=512, n_seq=3)
        assert kv_cache_bytes(shape, n_ctx=n_ctx, n_seq=3) == measured.kv_bytes
        assert abs(output_buffer_bytes(shape, n_ctx=n_ctx, n_batch=512, n_seq=3) - measured.output_bytes) <= 0.005 * MiB


@pytest.mark.slow
def test_simulated_allocation_equals_real_allocation(models: dict[str, tuple[ModelShape, Path]]) -> None:
    _, path = models["d64-gqa2"]
    for flash_attn, type_k in ((True, "q8_0"), (False, "f16")):
        settings = dict(n_ctx=4096, n_ubatch=512, n_batch=512, type_k=type_k, flash_attn=flash_attn)
        simulated = measure_allocations(path, **settings)
        real = measure_allocations(path, simulate=False, **settings)
        assert (simulated.weights, simulated.kv, simulated.compute) == (real.weights, real.kv, real.compute)


LLAMA3_8B = ModelShape(32, 4096, 32, 8, 128, 128, 14336, 128256, 8192)
LLAMA3_70B = ModelShape(80, 8192, 64, 8, 128, 128, 28672, 128256, 8192)
MILLION = 1024 * 1024


def test_published_kv_sizes_of_llama3() -> None:
    assert kv_cache_bytes(LLAMA3_8B, n_ctx=MILLION) == 128 * GiB
    assert kv_cache_bytes(LLAMA3_70B, n_ctx=MILLION) == 320 * GiB
    assert kv_cache_bytes(LLAMA3_70B, n_ctx=MILLION, type_k="q8_0", type_v="q8_0") == 170 * GiB
    assert kv_cache_bytes(LLAMA3_70B, n_ctx=MILLION, type_k="q4_0", type_v="q4_0") == 90 * GiB
    assert kv_cache_bytes(LLAMA3_8B, n_ctx=1) == kv_cache_bytes(LLAMA3_8B, n_ctx=256) == 256 * 128 * 1024


def test_score_matrix_dominates_without_flash_attention() -> None:
    # 8B at 128K, ubatch 512: the n_ctx × n_ubatch × n_head f32 scores are 8 GiB
    without = compute_buffer_bytes(LLAMA3_8B, n_ctx=131072, n_ubatch=512, flash_attn=False)
    with_fa = compute_buffer_bytes(LLAMA3_8B, n_ctx=131072, n_ubatch=512, flash_attn=True)
    assert 8 * GiB < without < 8.4 * GiB
    assert with_fa < 0.3 * GiB  # the logits of 512 tokens (250 MiB) are the largest part left


def test_quantized_cache_needs_whole_blocks() -> None:
    tiny_heads = ModelShape(2, 64, 4, 4, 16, 16, 128, 256, 512)
    with pytest.raises(ValueError, match="head size is 16"):
        validate_kv(tiny_heads, "q8_0", "f16", flash_attn=True)
    validate_kv(tiny_heads, "f16", "f16", flash_attn=False)


def test_quantized_v_needs_flash_attention() -> None:
    with pytest.raises(ValueError, match="flash attention"):
        validate_kv(LLAMA3_8B, "q8_0", "q8_0", flash_attn=False)
    with pytest.raises(ValueError, match="flash attention"):
        kv_cache_bytes(LLAMA3_8B, n_ctx=4096, type_k="f16", type_v="q4_0", flash_attn=False)


def test_unknown_cache_type_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown KV cache type"):
        validate_kv(LLAMA3_8B, "q3_x", "f16", flash_attn=True)
