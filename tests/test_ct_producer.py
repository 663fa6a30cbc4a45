"""Checkpoints written by compressed-tensors itself (tests/fixtures/ct_producer.py), the library llm-compressor saves
NVFP4, MXFP4 and W4A16/W8A16 checkpoints with: we read them to the values the library's own `dequantize` gives, and
the GGUF holds its codes and scales unchanged.

Needs the `producers` extra (compressed-tensors with a CPU torch; see the README's test section). CI installs it, so
these run there; without it they are reported as skipped."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

pytest.importorskip("compressed_tensors", reason="the `producers` extra (compressed-tensors, torch) is not installed")

from lcrun.convert import fp4  # noqa: E402
from lcrun.convert.convert import convert_checkpoint  # noqa: E402
from lcrun.convert.quant_config import load_quantization_config  # noqa: E402
from lcrun.convert.quants import Q  # noqa: E402
from lcrun.convert.safetensors_io import Checkpoint  # noqa: E402
from tests.fixtures.ct_producer import make_ct_checkpoint  # noqa: E402

SMALL = {"hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 2, "layers": 2}
TYPES = {"nvfp4": Q.NVFP4, "mxfp4": Q.MXFP4, "int4": Q.Q4_0, "int4-asym": Q.Q4_1, "int8": Q.Q8_0}


@pytest.mark.parametrize("preset", list(TYPES))
def test_library_checkpoints_read_and_convert_exactly(tmp_path: Path, preset: str) -> None:
    produced = make_ct_checkpoint(tmp_path / "hf", preset, group_size=64 if preset.startswith("int4") else None,
                                  **SMALL)
    path = produced.ck.path
    config = json.loads((path / "config.json").read_text())
    with Checkpoint(path, load_quantization_config(path, config)) as ckpt:
        for name, library in produced.library_values.items():
            ours = ckpt.rows(name, 0, library.shape[0])
            if preset == "nvfp4":  # the library divides each scale by the global scale first: 1-2 ulp apart
                assert np.allclose(ours, library, rtol=2 ** -22, atol=0), name
            else:
                assert np.array_equal(ours, library), name
    result = convert_checkpoint(path, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(result.paths[0])
    tensors = {t.name: t for t in reader.tensors}
    up = tensors["blk.1.ffn_up.weight"]
    assert up.tensor_type == TYPES[preset]
    if preset == "nvfp4":
        # the block tensor is the library's E2M1 codes times its E4M3 scales exactly; the global scale goes to .scale
        import torch
        from safetensors.torch import load_file

        stored = load_file(str(path / "model.safetensors"))
        mod = "model.layers.1.mlp.up_proj."
        codes = fp4.unpack_codes(stored[mod + "weight_packed"].numpy())
        products = fp4.E2M1[codes] * np.repeat(stored[mod + "weight_scale"].to(torch.float32).numpy(), 16, axis=1)
        assert np.array_equal(gguf.quants.dequantize(up.data, Q.NVFP4), products)
        g = stored[mod + "weight_global_scale"].numpy()[0]
        assert float(tensors["blk.1.ffn_up.scale"].data[0]) == np.float32(1) / np.float32(g)
    if preset in ("nvfp4", "int4-asym"):
        llm = llama_cpp.Llama(model_path=str(result.paths[0]), n_ctx=128, verbose=False)
        try:
            assert llm.create_completion("Hello", max_tokens=4)["usage"]["completion_tokens"] >= 1
        finally:
            llm.close()
