"""Quantize the conversion benchmark's checkpoint (make_bench_checkpoint.py: 128256-token vocabulary, 8 layers) into
one of the 4-bit formats, as its producer lays it out (tests/fixtures/quant_factory.py), for bench_convert.py.

    .venv/bin/python benchmarks/make_quant_checkpoint.py SRC OUTDIR --format ct-nvfp4

Formats: modelopt-nvfp4, ct-nvfp4, ct-mxfp4, ct-int4, ct-int4-asym, gptq, gptq-asym, awq (group size 128 for the
integer ones, as the published Llama 3.1 W4A16 / GPTQ / AWQ checkpoints use). The embedding and lm_head stay BF16.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcrun.convert.safetensors_io import Checkpoint  # noqa: E402
from tests.fixtures import quant_factory  # noqa: E402
from tests.fixtures.safetensors_writer import save_safetensors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", required=True, choices=[f for f in quant_factory.FORMATS
                                                            if f not in ("modelopt-mixed", "ct-int8", "gptq-desc-act")])
    args = parser.parse_args()
    quant_factory.GROUP = 128
    args.out.mkdir(parents=True, exist_ok=True)
    for f in args.src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, args.out / f.name)
    config = json.loads((args.src / "config.json").read_text())
    stored: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    with Checkpoint(args.src) as ckpt:
        for name in ckpt.names:
            rows = ckpt.rows(name, 0, ckpt.shape(name)[0]) if ckpt.shape(name) else ckpt.rows(name, 0, 1)
            stored[name] = rows
            if ".layers." in name and name.endswith("_proj.weight"):
                quant_factory._quantize_module(args.format, name, rows.astype(np.float32), stored, rng)
    qc, hf = quant_factory._config(args.format, config["num_hidden_layers"])
    if qc is not None:
        config["quantization_config"] = qc
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    if hf is not None:
        (args.out / "hf_quant_config.json").write_text(json.dumps(hf, indent=2))
    names = list(stored)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        filename = f"model-{i:05d}-of-00002.safetensors"
        save_safetensors(args.out / filename, {n: stored[n] for n in part}, {"format": "pt"})
        weight_map.update({n: filename for n in part})
    (args.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    print(f"{args.format}: {sum(v.nbytes for v in stored.values()) / 2**20:.0f} MiB in {args.out}")


if __name__ == "__main__":
    main()
