"""The planner's choices and refusals, and `lcrun plan --verify` against llama.cpp's own dry run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcrun.devices import Device
from lcrun.model_spec import spec_from_profile
from lcrun.planner import PlanRefused, choose
from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.cli import invoke, run_lcrun

GIB = 1 << 30


def machine(gpu_gib: float | None, ram_gib: float) -> list[Device]:
    gpus = [Device("CUDA0", int(gpu_gib * GIB), int(gpu_gib * GIB), is_gpu=True, detected=False)] if gpu_gib else []
    return [*gpus, Device("CPU", int(ram_gib * GIB), int(ram_gib * GIB), is_gpu=False, detected=False)]


def test_everything_fits_gives_the_full_context_at_f16() -> None:
    choice = choose(spec_from_profile("llama-3.1-8b"), "Q4_K_M", machine(80, 64))
    assert choice.estimate.ctx == 131072 and choice.estimate.type_k == "f16" and choice.estimate.n_gpu_layers == 33
    assert "maximum context" in choice.why


def test_auto_kv_takes_the_least_lossy_type_that_reaches_the_context() -> None:
    spec = spec_from_profile("llama-3.1-8b")
    # f16 KV at 128K is 16 GiB: with 4.6 GiB of weights it fits neither a 16 GiB GPU nor, in part, 2 GiB of RAM;
    # q8_0 (8.5 GiB) does
    choice = choose(spec, "Q4_K_M", machine(16, 2))
    assert (choice.estimate.type_k, choice.estimate.ctx, choice.estimate.fits) == ("q8_0", 131072, True)
    assert "less compressed types do not reach it" in choice.why


def test_auto_context_is_limited_by_memory_and_says_why() -> None:
    spec = spec_from_profile("gradient-70b-1048k")
    choice = choose(spec, "Q4_K_M", machine(24, 64))
    assert choice.estimate.fits and 0 < choice.estimate.ctx < spec.n_ctx_train and choice.estimate.ctx % 256 == 0
    assert choice.estimate.type_k == "q4_0"
    assert choice.why.startswith("context limited to") and "RAM needs" in choice.why


def test_cpu_only_runs_take_flash_attention_off_when_its_compute_buffer_fits() -> None:
    spec = spec_from_profile("llama-3.1-8b")
    roomy = choose(spec, "Q4_K_M", machine(None, 64), ctx=32768)
    assert not roomy.estimate.flash_attn and roomy.estimate.fits and "flash attention off" in roomy.why
    on = choose(spec, "Q4_K_M", machine(None, 64), ctx=32768, flash_attn="on")
    assert on.estimate.flash_attn
    assert on.estimate.compute_bytes < roomy.estimate.compute_bytes  # what "off" costs in memory
    # negative controls: too little RAM for the larger buffer, a GPU run, a quantized V cache
    tight = choose(spec, "Q4_K_M", machine(None, on.estimate.total_bytes / GIB + 0.5), ctx=32768)
    assert tight.estimate.flash_attn and tight.estimate.fits and "flash attention off" not in tight.why
    assert choose(spec, "Q4_K_M", machine(80, 64), ctx=32768).estimate.flash_attn
    assert choose(spec, "Q4_K_M", machine(None, 64), ctx=32768, kv_type="q8_0").estimate.flash_attn


def test_an_explicit_context_that_cannot_fit_is_refused_with_the_fix() -> None:
    spec = spec_from_profile("gradient-70b-1048k")
    with pytest.raises(PlanRefused, match=r"1,048,576 tokens do not fit: .*use --ctx [\d,]+ or less"):
        choose(spec, "Q4_K_M", machine(24, 64), ctx=1 << 20, kv_type="q4_0")


def test_weights_that_cannot_fit_are_refused() -> None:
    with pytest.raises(PlanRefused, match="smaller quant"):
        choose(spec_from_profile("llama-3.1-405b"), "Q4_K_M", machine(24, 64))


def test_plan_verify_matches_llama_cpp_dry_run(tmp_path: Path) -> None:
    make_llama_checkpoint(tmp_path / "ck", hidden=256, layers=2, heads=4, kv_heads=2, ffn=768)  # head_dim 64
    model = tmp_path / "m.gguf"
    converted = invoke("convert", str(tmp_path / "ck"), "-o", str(model), "-q", "--outtype", "f16")
    assert converted.exit_code == 0, converted.stderr
    # plan --verify in a child process: llama.cpp's dry run may write to file descriptor 1 itself, past the sys.stdout
    # an in-process run captures; only the real stdout shows that --json stays one parseable document
    run = run_lcrun("plan", str(model), "--ctx", "2k", "--kv-type", "q8_0", "--ram", "8G", "--verify", "--json",
                    timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    measured = result["llama_cpp"]
    assert result["ctx"] == 2048 and result["type_k"] == "q8_0"
    assert result["weights_bytes"] == measured["weights_bytes"]
    assert result["kv_bytes"] == measured["kv_bytes"] > 0
    assert abs(result["compute_bytes"] - measured["compute_bytes"]) <= 0.05 * measured["compute_bytes"]


# -- RPC workers: layers over this machine and the workers (the placement itself is checked against llama.cpp's own
# per-device allocation in tests/test_rpc.py) ------------------------------------------------------------------------
def worker(host: str, gib: float) -> Device:
    return Device(f"RPC0[{host}]", int(gib * GIB), int(gib * GIB), is_gpu=False, detected=False, host=host)


def test_workers_hold_layers_in_proportion_to_what_fits_them() -> None:
    spec = spec_from_profile("llama-3.1-70b")
    devices = [*machine(None, 32), worker("a:50052", 64), worker("b:50052", 32)]
    plan = choose(spec, "Q4_K_M", devices, ctx=32768, kv_type="f16").estimate
    cpu, a, b = (next(d for d in plan.devices if d.host == h) for h in ("", "a:50052", "b:50052"))
    # llama.cpp's order: the CPU's layers first, then the workers', the output layer with the last
    assert (cpu.first_layer, a.first_layer, b.first_layer) == (0, cpu.layers, cpu.layers + a.layers)
    assert cpu.layers + a.layers + b.layers == 80 and b.output_layer and not (a.output_layer or cpu.output_layer)
    assert plan.offload == ["RPC0[a:50052]", "RPC0[b:50052]"] and plan.tensor_split == [a.layers, b.layers + 1]
    assert plan.n_gpu_layers == 81 - cpu.layers
    # in proportion: the 64 GiB worker holds about twice what each 32 GiB host holds, and everyone fits
    assert 1.7 < a.layers / b.layers < 2.3 and 0.8 < cpu.layers / b.layers < 1.25
    assert all(d.bytes <= d.free_bytes for d in plan.devices) and plan.fits
    assert plan.kv_bytes == cpu.kv_bytes + a.kv_bytes + b.kv_bytes  # each layer's KV goes with it


def test_a_local_gpu_comes_after_the_workers_and_takes_the_output_layer() -> None:
    spec = spec_from_profile("llama-3.1-70b")
    plan = choose(spec, "Q4_K_M", [*machine(24, 32), worker("a:50052", 48)], ctx=16384, kv_type="q8_0").estimate
    assert plan.offload == ["RPC0[a:50052]", "CUDA0"]
    gpu = next(d for d in plan.devices if d.name == "CUDA0")
    assert gpu.output_layer and gpu.bytes <= gpu.free_bytes and gpu.layers > 0


def test_forced_gpu_layers_fix_the_cpus_share_with_workers() -> None:
    spec = spec_from_profile("llama-3.1-8b")
    plan = choose(spec, "Q8_0", [*machine(None, 64), worker("a:50052", 64), worker("b:50052", 64)], ctx=8192,
                  n_gpu_layers=10).estimate
    cpu = next(d for d in plan.devices if not d.host)
    assert plan.n_gpu_layers == 10 and cpu.layers == 33 - 10 and sum(plan.tensor_split) == 10


def test_partial_gpu_offload_takes_the_output_layer_first() -> None:
    """llama.cpp 0.3.36 offloads the output layer first, then the repeating layers from the last one down."""
    spec = spec_from_profile("llama-3.1-8b")
    plan = choose(spec, "Q4_K_M", machine(4, 64), ctx=8192, kv_type="f16").estimate
    gpu = next(d for d in plan.devices if d.name == "CUDA0")
    assert 1 < plan.n_gpu_layers < 33 and gpu.output_layer
    assert gpu.layers == plan.n_gpu_layers - 1 and gpu.first_layer == 32 - gpu.layers
    assert gpu.bytes <= 4 * GIB


def test_a_plan_that_fits_nowhere_says_how_much_memory_is_missing() -> None:
    spec = spec_from_profile("llama-3.1-405b")
    with pytest.raises(PlanRefused, match=r"131,072 tokens do not fit: .*\((\d+) GiB more memory is needed over the "
                                          r"3 hosts: e\.g\. another worker, planned with --rpc-mem HOST=\1G\)"):
        choose(spec, "Q4_K_M", [*machine(None, 64), worker("a:50052", 80), worker("b:50052", 80)], ctx=131072,
               kv_type="q8_0")
    # with a third 80 GiB worker it fits (so the refusal above is about memory, not about workers)
    assert choose(spec, "Q4_K_M", [*machine(None, 64), *(worker(f"{h}:50052", 80) for h in "abc")], ctx=131072,
                  kv_type="q8_0").estimate.fits
