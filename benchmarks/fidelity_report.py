"""Prints the fidelity figures recorded in docs/performance.md: with the harness of tests/test_fidelity.py
(tests/fixtures/fidelity.py), the relative max logit error of llama.cpp on our GGUF against the float64 reference,
below and beyond the original context, plus the negative control (scaling dropped).

Run: .venv/bin/python -m benchmarks.fidelity_report   (from the repository root; ~1 minute)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from lcrun.convert.convert import convert_checkpoint
from tests.fixtures.fidelity import (
    BELOW,
    BEYOND,
    Comparison,
    compare,
    convert_and_compare,
    drop_rope_scaling,
    llama_cpp_logits,
    probe_tokens,
    reference_logits,
    rope_checkpoint,
)

CASES = [("theta", "legacy", "bf16", o) for o in ("f32", "f16", "bf16", "q8_0")] + [
    ("llama3", "legacy", "bf16", o) for o in ("f32", "f16", "bf16", "q8_0", "q4_0")] + [
    ("llama3", "v5", "f16", "f16"), ("linear", "legacy", "f16", "f32"), ("linear", "v5", "bf16", "bf16"),
    ("yarn", "legacy", "f32", "f16"), ("yarn", "v5", "bf16", "bf16")]
FP8 = ["fbgemm", "autofp8", "ct-tensor", "ct-channel", "ct-block", "block-inv"]


def row(label: str, c: Comparison) -> str:
    below, beyond = c.worst(BELOW), c.worst(BEYOND)
    top1 = "yes" if all(c.same_top1.values()) else "NO"
    return f"| {label} | {below:.3%} | {beyond:.3%} | {top1} |"


def main() -> None:
    print("| case (rope, config form, source → out) | max rel. error, pos < 256 | pos 600/1000 | top-1 same |")
    print("|---|---|---|---|")
    for kind, form, dtype, out in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            ck = rope_checkpoint(Path(tmp), kind, config_form=form, dtype=dtype, seed=0)
            print(row(f"{kind}, {form}, {dtype} → {out}", convert_and_compare(ck, Path(tmp), out)), flush=True)
    for fmt in FP8:
        with tempfile.TemporaryDirectory() as tmp:
            ck = rope_checkpoint(Path(tmp), "llama3", config_form="legacy", dtype="bf16", fp8=fmt, ffn=320, seed=4)
            print(row(f"FP8 {fmt} → f16", convert_and_compare(ck, Path(tmp), "f16")), flush=True)
    for kind in ("llama3", "linear", "yarn"):
        with tempfile.TemporaryDirectory() as tmp:
            ck = rope_checkpoint(Path(tmp), kind, config_form="legacy", dtype="bf16", seed=0)
            drop_rope_scaling(ck)
            tokens = probe_tokens(ck.config["vocab_size"])
            path = convert_checkpoint(ck.path, Path(tmp) / "u.gguf", outtype="f32").paths[0]
            c = compare(llama_cpp_logits(path, tokens), reference_logits(ck, tokens))
            print(row(f"negative control: {kind} scaling dropped, f32", c), flush=True)


if __name__ == "__main__":
    main()
