"""Prints the estimator's accuracy figures recorded in docs/performance.md: lcrun's memory model against llama.cpp's
own allocations (no_alloc dry run, exact bytes from llama.cpp's memory breakdown) over the matrix that
tests/test_memory_model.py asserts on (tests/fixtures/memory_cases.py): 3 model shapes × n_ctx 512/4096/33000 ×
n_ubatch 512/128 × flash attention on/off × KV f16/q8_0/q4_0 (quantized V only with flash attention).

Run: .venv/bin/python -m benchmarks.estimate_accuracy   (from the repository root; ~10 s)
"""
from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

from lcrun.engine.allocations import measure_allocations
from lcrun.memory_model import compute_buffer_bytes, kv_cache_bytes, output_buffer_bytes
from tests.fixtures.memory_cases import file_weights_bytes, memory_cases, write_memory_models


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = write_memory_models(Path(tmp))
        kv_off, weights_off, n = 0, 0, 0
        compute_err: dict[str, list[float]] = defaultdict(list)
        total_err: list[float] = []
        for name, n_ctx, n_ubatch, fa, type_k, type_v in memory_cases():
            shape, path = models[name]
            m = measure_allocations(path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_batch=512, type_k=type_k, type_v=type_v,
                                    flash_attn=fa)
            kv = kv_cache_bytes(shape, n_ctx=n_ctx, type_k=type_k, type_v=type_v, flash_attn=fa)
            compute = compute_buffer_bytes(shape, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=fa, type_k=type_k,
                                           type_v=type_v)
            weights = file_weights_bytes(path)
            output = output_buffer_bytes(shape, n_ctx=n_ctx, n_batch=512)
            kv_off += abs(kv - m.kv_bytes)
            weights_off += abs(weights - m.weights_bytes)
            family = f"flash attention {'on' if fa else 'off'}, K {'f16' if type_k == 'f16' else 'quantized'}"
            compute_err[family].append(compute / m.compute_bytes - 1)
            measured_total = m.weights_bytes + m.kv_bytes + m.compute_bytes + m.output_bytes
            total_err.append((weights + kv + compute + output) / measured_total - 1)
            n += 1
    print(f"{n} cases; KV bytes off in total: {kv_off}; weights bytes off in total: {weights_off}")
    print("| compute buffer, case family | cases | min error | max error |")
    print("|---|---|---|---|")
    for family, errors in sorted(compute_err.items()):
        print(f"| {family} | {len(errors)} | {min(errors):+.2%} | {max(errors):+.2%} |")
    print(f"| total (weights + KV + compute + output) | {len(total_err)} | {min(total_err):+.2%} | {max(total_err):+.2%} |")


if __name__ == "__main__":
    main()
