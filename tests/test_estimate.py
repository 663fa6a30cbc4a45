"""`lcrun estimate`: big-model sanity from MODEL_FACTS, every kind of MODEL (profile, Hub repo through the fake Hub,
local checkpoint, local GGUF), the offline fallback to a profile, and bad input as one line. The command runs in
process (tests/fixtures/cli.py); one test runs it in a child process, end to end."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from click.testing import Result

from lcrun.devices import Device
from lcrun.estimate import estimate_memory
from lcrun.model_spec import spec_from_profile
from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.cli import assert_one_line_error, invoke, run_lcrun
from tests.fixtures.hub_server import FakeHub

GIB = 1 << 30
BIG_MACHINE = [Device("CPU", 4096 * GIB, 4096 * GIB, is_gpu=False, detected=False)]


def plans(run: Result) -> list[dict]:
    assert run.exit_code == 0, run.stderr
    return json.loads(run.stdout)["plans"]  # --json prints one document


@pytest.mark.parametrize(("profile", "type_kv", "gib"), [
    ("gradient-70b-1048k", "f16", 320), ("gradient-70b-1048k", "q8_0", 170), ("gradient-70b-1048k", "q4_0", 90),
    ("gradient-8b-1048k", "f16", 128)])
def test_kv_cache_of_the_big_models_matches_model_facts(profile: str, type_kv: str, gib: int) -> None:
    spec = spec_from_profile(profile)
    plan = estimate_memory(spec, "Q4_K_M", 1 << 20, BIG_MACHINE, type_k=type_kv, type_v=type_kv, flash_attn=True)
    assert plan.kv_bytes == gib * GIB


def test_kv_per_token_of_405b() -> None:
    plan = estimate_memory(spec_from_profile("llama-3.1-405b"), "Q4_K_M", 1024, BIG_MACHINE)
    assert plan.kv_bytes == 504 * 1024 * 1024  # 504 KiB per token in f16


def test_profile_estimate_json_has_every_field() -> None:
    run = invoke("estimate", "llama-3.1-8b", "--quant", "Q4_K_M", "--ctx", "32k", "--kv-type", "q8_0",
                 "--gpu-mem", "24G", "--ram", "64G", "--json")
    [plan] = plans(run)
    for key in ("model", "quant", "ctx", "type_k", "type_v", "flash_attn", "n_ubatch", "n_gpu_layers", "weights_bytes",
                "kv_bytes", "compute_bytes", "output_bytes", "total_bytes", "devices", "fits"):
        assert key in plan, key
    assert plan["ctx"] == 32768 and plan["type_k"] == plan["type_v"] == "q8_0" and plan["n_gpu_layers"] == 33
    assert [d["name"] for d in plan["devices"]] == ["CUDA0", "CPU"] and plan["fits"] is True
    assert 4.5 * GIB < plan["weights_bytes"] < 5.0 * GIB  # Llama-3-8B Q4_K_M is 4.58 GiB (llama.cpp's scoreboard)


def test_table_says_what_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    run = invoke("estimate", "gradientai/Llama-3-70B-Instruct-Gradient-1048k", "--quant", "Q4_K_M", "--kv-type", "q4_0",
                 "--gpu-mem", "8G", "--ram", "16G")
    assert run.exit_code == 0, run.stderr
    assert "using lcrun's built-in profile" in run.stdout  # the Hub is offline in the tests
    assert "largest context that fits: Q4_K_M with KV q4_0: does not fit at any context" in run.stdout
    assert "1,048,576" in run.stdout


def test_largest_context_is_the_edge_of_fitting() -> None:
    from lcrun.estimate import largest_fitting_ctx

    spec = spec_from_profile("gradient-70b-1048k")
    machine = [Device("CUDA0", 24 * GIB, 24 * GIB, is_gpu=True, detected=False),
               Device("CPU", 64 * GIB, 64 * GIB, is_gpu=False, detected=False)]
    options = dict(type_k="q4_0", type_v="q4_0", flash_attn=True)
    best = largest_fitting_ctx(spec, "Q4_K_M", machine, max_ctx=1 << 20, **options)
    assert 0 < best < 1 << 20 and best % 256 == 0
    at_best = estimate_memory(spec, "Q4_K_M", best, machine, **options)
    beyond = estimate_memory(spec, "Q4_K_M", best + 256, machine, **options)
    assert at_best.fits and not beyond.fits and "RAM needs" in beyond.binding
    assert 0 < at_best.n_gpu_layers < spec.n_layer  # partial offload: as many layers as the 24 GiB GPU holds
    assert at_best.devices[0].bytes <= 24 * GIB


def test_offline_without_profile_is_one_line() -> None:
    # the end-to-end run of estimate: `python -m lcrun.cli` in a child process, whose exit status and stderr are what
    # a shell sees; the Hub is offline through the inherited HF_HUB_OFFLINE
    run = run_lcrun("estimate", "someone/Unknown-Model", timeout=120)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "cannot be reached" in run.stderr


def test_hub_repo_reads_only_headers(fake_hub: FakeHub, tmp_path: Path) -> None:
    ck = make_llama_checkpoint(tmp_path / "ck", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, shards=2)
    files = {p.name: p.read_bytes() for p in ck.path.iterdir()}
    fake_hub.add_repo("org/Tiny-Llama", files)
    run = invoke("estimate", "org/Tiny-Llama", "--quant", "Q8_0", "--ctx", "1024", "--ram", "8G", "--json")
    [plan] = plans(run)
    assert plan["ctx"] == 1024 and plan["fits"]
    weights = sum(len(b) for n, b in files.items() if n.endswith(".safetensors"))
    assert fake_hub.bytes_served() < 100_000 < weights


def test_local_gguf_uses_the_file_sizes(tmp_path: Path) -> None:
    make_llama_checkpoint(tmp_path / "ck", hidden=128, layers=2, heads=4, kv_heads=2, ffn=256)
    out = tmp_path / "m.gguf"
    assert invoke("convert", str(tmp_path / "ck"), "-o", str(out), "--outtype", "q8_0", "-q").exit_code == 0
    [plan] = plans(invoke("estimate", str(out), "--ctx", "512", "--ram", "8G", "--json"))
    assert plan["weights_bytes"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors)
    assert plan["quant"] == "Q8_0"


@pytest.mark.parametrize(("args", "needle"), [
    (["no/such", "--ctx", "1k"], "cannot be reached"),
    (["not-a-profile"], "no such file, folder or built-in profile"),
    (["llama-3.1-8b", "--ctx", "256k"], "above the model's maximum"),
    (["llama-3.1-8b", "--kv-type", "q8_0/q4_0", "--flash-attn", "off"], "flash attention"),
    (["llama-3.1-8b", "--ctx", "12q"], "context length"),
])
def test_bad_input_is_one_line(args: list[str], needle: str) -> None:
    assert_one_line_error(invoke("estimate", *args), needle)


def test_quantized_kv_with_small_head_dim_is_refused(tmp_path: Path) -> None:
    make_llama_checkpoint(tmp_path / "ck", hidden=64, layers=1, heads=4, kv_heads=2, ffn=128)  # head_dim 16
    run = invoke("estimate", str(tmp_path / "ck"), "--kv-type", "q8_0", "--ctx", "512")
    assert run.exit_code == 1 and "head" in run.stderr and run.stderr.count("\n") == 1


def test_malformed_config(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{oops")
    run = invoke("estimate", str(tmp_path / "ck"))
    assert run.exit_code == 1 and "config.json" in run.stderr and run.stderr.count("\n") == 1


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    run = invoke("estimate", str(bad))
    assert run.exit_code == 1 and str(bad) in run.stderr and run.stderr.count("\n") == 1


def test_hub_gguf_repo_reads_only_the_header(fake_hub: FakeHub, tmp_path: Path) -> None:
    make_llama_checkpoint(tmp_path / "ck", hidden=512, layers=4, heads=8, kv_heads=2, ffn=1536)
    model = tmp_path / "m.gguf"
    assert invoke("convert", str(tmp_path / "ck"), "-o", str(model), "--outtype", "q8_0", "-q").exit_code == 0
    assert model.stat().st_size > 8 << 20  # far more than one header read
    fake_hub.add_repo("org/Tiny-GGUF", {"m-Q8_0.gguf": model.read_bytes()})
    [plan] = plans(invoke("estimate", "org/Tiny-GGUF", "--file", "m-Q8_0.gguf", "--ctx", "1k", "--ram", "8G", "--json"))
    assert plan["weights_bytes"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(model).tensors)
    assert plan["quant"] == "Q8_0"
    assert 0 < fake_hub.bytes_served() <= 1 << 20  # one 1 MiB range read holds this header; no tensor data beyond
