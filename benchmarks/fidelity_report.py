"""Prints the fidelity figures recorded in docs/performance.md: with the harness of tests/test_fidelity.py
(tests/fixtures/fidelity.py), the relative max logit error of llama.cpp on our GGUF against the float64 reference,
below and beyond the original context, plus the negative control (scaling dropped).

Run: .venv/bin/python -m benchmarks.fidelity_report   (from the repository root; ~1 minute)
     .venv/bin/python -m benchmarks.fidelity_report --quantized   (the 4-bit formats: lcrun's GGUF against the
     reference and against an F32 GGUF of the same dequantized weights, and llama.cpp's own converter's GGUF of the
     same checkpoint where it reads the format; needs benchmarks/setup_peer.sh; ~3 minutes)
"""
from __future__ import annotations

import subprocess
import sys
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


QUANTIZED = [a for a in sys.argv[2:]] or ["modelopt-nvfp4", "modelopt-mixed", "ct-nvfp4", "ct-mxfp4", "ct-int4", "ct-int4-asym", "ct-int8",
             "gptq", "gptq-asym", "gptq-desc-act", "awq"]
REPO = Path(__file__).resolve().parent.parent
PEER = [str(REPO / "bench-work" / "peer-venv" / "bin" / "python"), str(REPO / "benchmarks" / "run_peer.py")]


def quantized() -> None:
    from tests.fixtures.fidelity import ROPES
    from tests.fixtures.quant_factory import dequantized_twin, make_quantized_checkpoint

    print("| checkpoint → lcrun's GGUF | vs reference, pos < 256 | pos 600/1000 | vs F32 GGUF of the same weights "
          "| lcrun `--outtype f16`: vs reference | llama.cpp's converter: vs reference (its types) |")
    print("|---|---|---|---|---|---|")
    rope, theta = ROPES["llama3"]
    for fmt in QUANTIZED:
        with tempfile.TemporaryDirectory() as tmp:
            ck = make_quantized_checkpoint(Path(tmp) / "hf", fmt, rope=rope, rope_theta=theta,
                                           max_position_embeddings=2048, seed=4)
            tokens = probe_tokens(ck.config["vocab_size"])
            ref = reference_logits(ck, tokens)
            result = convert_checkpoint(ck.path, Path(tmp) / "q.gguf")
            ours = llama_cpp_logits(result.paths[0], tokens)
            twin = convert_checkpoint(dequantized_twin(ck, Path(tmp) / "twin"), Path(tmp) / "f.gguf", outtype="f32")
            f32 = compare(ours, llama_cpp_logits(twin.paths[0], tokens))
            c = compare(ours, ref)
            f16 = compare(llama_cpp_logits(convert_checkpoint(ck.path, Path(tmp) / "h.gguf", outtype="f16").paths[0],
                                           tokens), ref)
            kinds = "/".join(sorted(t for t in result.tensor_types if t not in ("F32", "BF16")))
            peer = _peer(ck.path, Path(tmp) / "p.gguf", tokens, ref)
            top1 = "" if all(c.same_top1.values()) else " (top-1 differs)"
            print(f"| {fmt} → {kinds} | {c.worst(BELOW):.2%} | {c.worst(BEYOND):.2%}{top1} | {f32.worst():.2%} "
                  f"| {f16.worst():.2%} | {peer} |", flush=True)


def _peer(ckpt: Path, out: Path, tokens: list[int], ref) -> str:
    if not Path(PEER[0]).exists():
        return "not measured (run benchmarks/setup_peer.sh)"
    run = subprocess.run([*PEER, str(ckpt), "--outtype", "auto", "--outfile", str(out)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["?"])[-1]
        return f"refused: {last[:90]}"
    import gguf
    types = sorted({t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.name.startswith("blk.")} - {"F32"})
    c = compare(llama_cpp_logits(out, tokens), ref)
    return f"{c.worst():.2%}{'' if all(c.same_top1.values()) else ', top-1 differs'} ({'/'.join(types)})"


def main() -> None:
    if "--quantized" in sys.argv:
        quantized()
        return
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
