"""Prints the fidelity figures recorded in docs/performance.md: for each case of tests/test_fidelity.py, the
relative max logit error of llama.cpp on our GGUF against the float64 reference, below and beyond the original
context, plus the negative control (scaling dropped).

Run: .venv/bin/python -m benchmarks.fidelity_report   (from the repository root; ~1 minute)
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tests import reference_llama as ref
from tests import test_fidelity as tf
from lcrun.convert.convert import convert_checkpoint

CASES = [("theta", "legacy", "bf16", o) for o in ("f32", "f16", "bf16", "q8_0")] + [
    ("llama3", "legacy", "bf16", o) for o in ("f32", "f16", "bf16", "q8_0", "q4_0")] + [
    ("llama3", "v5", "f16", "f16"), ("linear", "legacy", "f16", "f32"), ("linear", "v5", "bf16", "bf16"),
    ("yarn", "legacy", "f32", "f16"), ("yarn", "v5", "bf16", "bf16")]
FP8 = ["fbgemm", "autofp8", "ct-tensor", "ct-channel", "ct-block", "block-inv"]


def row(label: str, c: tf.Comparison) -> str:
    below = max(c.errors[w] for w in ("~100", "~250"))
    beyond = max(c.errors[w] for w in tf.BEYOND)
    top1 = "yes" if all(c.same_top1.values()) else "NO"
    return f"| {label} | {below:.3%} | {beyond:.3%} | {top1} |"


def main() -> None:
    print("| case (rope, config form, source → out) | max rel. error, pos < 256 | pos 600/1000 | top-1 same |")
    print("|---|---|---|---|")
    for kind, form, dtype, out in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            ck = tf._checkpoint(Path(tmp), kind, config_form=form, dtype=dtype, seed=0)
            print(row(f"{kind}, {form}, {dtype} → {out}", tf._convert_and_compare(ck, Path(tmp), out)), flush=True)
    for fmt in FP8:
        with tempfile.TemporaryDirectory() as tmp:
            ck = tf._checkpoint(Path(tmp), "llama3", config_form="legacy", dtype="bf16", fp8=fmt, ffn=320, seed=4)
            print(row(f"FP8 {fmt} → f16", tf._convert_and_compare(ck, Path(tmp), "f16")), flush=True)
    for kind in ("llama3", "linear", "yarn"):
        with tempfile.TemporaryDirectory() as tmp:
            ck = tf._checkpoint(Path(tmp), kind, config_form="legacy", dtype="bf16", seed=0)
            config = json.loads((ck.path / "config.json").read_text())
            config["rope_scaling"] = None
            (ck.path / "config.json").write_text(json.dumps(config))
            tokens = tf._tokens(ck.config["vocab_size"])
            path = convert_checkpoint(ck.path, Path(tmp) / "u.gguf", outtype="f32").paths[0]
            c = tf._compare(tf._llama_cpp_logits(path, tokens), ref.forward(ck.weights, ck.config, tokens))
            print(row(f"negative control: {kind} scaling dropped, f32", c), flush=True)


if __name__ == "__main__":
    main()
