"""`lcrun convert` and `lcrun quantize` through the real entry point: outputs llama.cpp loads, metadata read back with
gguf's reader, and every kind of bad input answered with one line, a non-zero exit, no traceback and nothing at the
output path. In process (tests/fixtures/cli.py) unless a test says why it needs a child process."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import llama_cpp
import ml_dtypes
import numpy as np
import pytest

from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.cli import assert_one_line_error, invoke, run_lcrun
from tests.fixtures.hub_server import FakeHub
from tests.fixtures.safetensors_writer import save_safetensors

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".gguf", ".partial") or ".gguf" in p.name)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    make_llama_checkpoint(tmp_path / "ckpt", hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, rope=LLAMA3,
                          shards=2)
    return tmp_path / "ckpt"


# ---- what works ------------------------------------------------------------------------------------------------------

def test_convert_writes_a_gguf_llama_cpp_loads(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    run = invoke("convert", str(ckpt), "-o", str(out), "--outtype", "q8_0")
    assert run.exit_code == 0, run.stderr
    assert run.stdout.strip() == str(out) and leftovers(out.parent) == ["m.gguf"]
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay F32, as in llama.cpp
    assert types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False)
    assert llm.n_vocab() > 0 and len(llm.tokenize(b"hello")) >= 1


def test_existing_output_is_refused_without_force(ckpt: Path, tmp_path: Path) -> None:
    # end to end, in a child process: `python -m lcrun.cli` reaches main(), whose one-line error and exit status are
    # what the shell sees, and a success exits 0
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert_one_line_error(run_lcrun("convert", str(ckpt), "-o", str(out), timeout=300), str(out), "--force")
    assert out.read_bytes() == b"precious"
    assert run_lcrun("convert", str(ckpt), "-o", str(out), "--force", timeout=300).returncode == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_default_name_follows_the_gguf_naming_convention(ckpt: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run = invoke("convert", str(ckpt), "--outtype", "f16", "-q")
    assert run.exit_code == 0, run.stderr
    written = Path(run.stdout.strip())
    assert written.parent == work and written.name.endswith("-F16.gguf")


def test_overrides_are_applied_and_recorded(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    assert invoke("convert", str(ckpt), "-o", str(out), "--rope-theta", "1000000", "--ctx", "8192").exit_code == 0
    fields = gguf.GGUFReader(out).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("llama.rope.freq_base") == 1000000.0
    assert value("llama.context_length") == 8192
    assert value("lcrun.override.rope_freq_base_original") == 10000.0
    assert value("lcrun.override.context_length_original") == 2048


def test_split_output_loads_and_matches_the_single_file(ckpt: Path, tmp_path: Path) -> None:
    single, split = tmp_path / "single.gguf", tmp_path / "split" / "m.gguf"
    split.parent.mkdir()
    assert invoke("convert", str(ckpt), "-o", str(single), "--outtype", "f32").exit_code == 0
    run = invoke("convert", str(ckpt), "-o", str(split), "--outtype", "f32", "--split-max-size", "60K")
    assert run.exit_code == 0, run.stderr
    assert {t.tensor_type for t in gguf.GGUFReader(single).tensors} == {gguf.GGMLQuantizationType.F32}
    parts = sorted(split.parent.iterdir())
    assert len(parts) >= 3 and [p.name for p in parts] == [f"m-{i:05d}-of-{len(parts):05d}.gguf"
                                                           for i in range(1, len(parts) + 1)]
    assert run.stdout.split() == [str(p) for p in parts]
    tokens = list(range(5, 60))
    logits = []
    for path in (single, parts[0]):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
        llm.eval(tokens)
        logits.append(np.array(llm.scores[: len(tokens)]))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_llama_cpp_quant_type_in_the_same_command(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    run = invoke("convert", str(ckpt), "-o", str(out), "--outtype", "Q4_K_M")
    assert run.exit_code == 0, run.stderr
    assert leftovers(tmp_path) == ["m.gguf"]  # the intermediate file is gone
    fields = gguf.GGUFReader(out).fields
    assert fields["general.file_type"].contents() == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(out).tensors}


def test_quantize_command_is_atomic_and_validates_input(ckpt: Path, tmp_path: Path) -> None:
    # quantize in a child process: llama.cpp and ggml may write to file descriptors 1 and 2 themselves, past the
    # sys.stdout/sys.stderr that an in-process run captures; only a child's stderr shows everything the user sees
    src, dst = tmp_path / "m.gguf", tmp_path / "m-q6.gguf"
    assert invoke("convert", str(ckpt), "-o", str(src), "--outtype", "f16").exit_code == 0
    run = run_lcrun("quantize", str(src), str(dst), "Q6_K", "-q", timeout=300)
    assert run.returncode == 0, run.stderr
    assert gguf.GGUFReader(dst).fields["general.file_type"].contents() == llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K
    assert_one_line_error(run_lcrun("quantize", str(src), str(dst), "Q6_K", timeout=300), "already exists")
    assert_one_line_error(run_lcrun("quantize", str(src), str(tmp_path / "x.gguf"), "Q9_Z", timeout=300), "Q9_Z")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(src.read_bytes()[:5000])
    assert_one_line_error(run_lcrun("quantize", str(broken), str(tmp_path / "y.gguf"), "Q6_K", timeout=300),
                          str(broken))
    assert not (tmp_path / "y.gguf").exists() and not list(tmp_path.glob("y.gguf*.partial"))  # partials: by writer


def test_convert_from_the_hub_records_provenance(fake_hub: FakeHub, ckpt: Path, tmp_path: Path) -> None:
    files = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    commit = fake_hub.add_repo("gradientai/Tiny-Gradient", files)
    out = tmp_path / "m.gguf"
    run = invoke("convert", "gradientai/Tiny-Gradient", "-o", str(out), "-q")
    assert run.exit_code == 0, run.stderr
    fields = gguf.GGUFReader(out).fields
    assert fields["lcrun.source.repo"].contents() == "gradientai/Tiny-Gradient"
    assert fields["lcrun.source.revision"].contents() == commit
    assert fields["general.source.repo_url"].contents() == "https://huggingface.co/gradientai/Tiny-Gradient"
    assert_one_line_error(invoke("convert", "gradientai/Missing", "-o", str(tmp_path / "n.gguf")), "gradientai/Missing")


def test_the_library_imports_no_application_dependencies() -> None:
    # a fresh interpreter: this one has imported everything already
    probe = ("import sys, lcrun.convert.convert; "
             "print([m for m in ('click', 'rich', 'llama_cpp', 'huggingface_hub', 'lcrun.cli') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    probe = "import sys, lcrun.cli; print([m for m in ('numpy', 'llama_cpp', 'rich', 'gguf') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


# ---- bad input -------------------------------------------------------------------------------------------------------

def _edit_config(ckpt: Path, **changes: object) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_missing_config(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").unlink()
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), str(ckpt), "config.json")
    assert leftovers(tmp_path) == []


def test_missing_tokenizer(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), str(ckpt), "tokenizer")
    assert leftovers(tmp_path) == []


def test_unsupported_architecture(ckpt: Path, tmp_path: Path) -> None:
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")),
                          "config.json", "GPT2LMHeadModel", "LlamaForCausalLM")


@pytest.mark.parametrize("scaling", [{"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [2.0]},
                                     {"rope_type": "su", "factor": 4.0}])
def test_rope_scaling_llama_cpp_cannot_express_is_refused(ckpt: Path, tmp_path: Path, scaling: dict) -> None:
    _edit_config(ckpt, rope_scaling=scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), "config.json", repr(kind))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("theta", ["NaN", "Infinity", "-Infinity", "0", "-10000", "\"big\""])
def test_bad_rope_theta(ckpt: Path, tmp_path: Path, theta: str) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = "__THETA__"
    path.write_text(json.dumps(config).replace('"__THETA__"', theta))
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), "config.json", "rope_theta")


def test_bad_rope_theta_override(ckpt: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf"), "--rope-theta", "nan"),
                          "--rope-theta")


def test_malformed_config(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), "config.json", "JSON")


def test_missing_shard_named_in_index(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")),
                          "model.safetensors.index.json", "model-00002-of-00002.safetensors")


def test_truncated_header_length_past_eof(ckpt: Path, tmp_path: Path) -> None:
    shard = ckpt / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:64])
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), str(shard), "header length")


def test_truncated_data_offsets_out_of_range(ckpt: Path, tmp_path: Path) -> None:
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), str(shard), "data offsets")
    assert leftovers(tmp_path) == []


def test_unsupported_dtype(tmp_path: Path) -> None:
    ck = make_llama_checkpoint(tmp_path / "c", hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, shards=1)
    stored = {n: w.astype(ml_dtypes.bfloat16) for n, w in ck.weights.items()}
    stored["model.layers.0.mlp.up_proj.weight"] = np.zeros((128, 64), np.int64)
    save_safetensors(ck.path / "model.safetensors", stored)
    assert_one_line_error(invoke("convert", str(ck.path), "-o", str(tmp_path / "m.gguf")),
                          "model.safetensors", "up_proj", "I64")


def test_tensor_shape_disagreeing_with_config(ckpt: Path, tmp_path: Path) -> None:
    _edit_config(ckpt, intermediate_size=256)
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf")), ".safetensors", "shape")


def test_unknown_outtype(ckpt: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("convert", str(ckpt), "-o", str(tmp_path / "m.gguf"), "--outtype", "q3_z"), "q3_z")


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")


def test_output_directory_not_writable(ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "ro"
    _mount_tmpfs(target, "ro,size=1m")
    try:
        assert_one_line_error(invoke("convert", str(ckpt), "-o", str(target / "m.gguf")), str(target), "writable")
        assert leftovers(target) == []
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_disk_full(ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "small"
    _mount_tmpfs(target, "size=120k")
    try:
        run = invoke("convert", str(ckpt), "-o", str(target / "m.gguf"), "--outtype", "f32")
        assert_one_line_error(run, "disk full")
        assert leftovers(target) == []
    finally:
        subprocess.run(["umount", str(target)], check=True)


# The signal tests run lcrun in a child process: the signal is sent to the whole process, and SIGKILL ends it.
_INTERRUPT_AFTER_FIRST_CHUNK = textwrap.dedent("""
    import os, signal, sys
    import lcrun.convert.convert as convert
    original = convert._write_next
    def write_then_signal(gout, window):
        n = original(gout, window)
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return n
    convert._write_next = write_then_signal
    from lcrun.cli import main
    main(sys.argv[2:])
""")


def test_ctrl_c_mid_write_leaves_nothing(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    run = subprocess.run([sys.executable, "-c", _INTERRUPT_AFTER_FIRST_CHUNK, "SIGINT", "convert", str(ckpt),
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 130
    assert_one_line_error(run, "interrupted")
    assert leftovers(tmp_path) == []


def test_kill_9_mid_write_leaves_no_output_and_a_rerun_succeeds(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    run = subprocess.run([sys.executable, "-c", _INTERRUPT_AFTER_FIRST_CHUNK, "SIGKILL", "convert", str(ckpt),
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL
    assert not out.exists()                      # only the .partial file may remain, never a half-written OUT
    assert invoke("convert", str(ckpt), "-o", str(out)).exit_code == 0
    assert leftovers(tmp_path) == ["m.gguf"]     # the stale .partial was replaced
    shutil.rmtree(ckpt)


def test_a_killed_converts_intermediate_goes_at_the_next_run_and_the_rename_is_synced(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20, finding 13: a kill -9 mid-convert leaves a model-sized intermediate; the next run in that directory
    removes it once its writer is gone (never a live writer's), and the output's rename is fsynced in its directory."""
    import os
    import stat
    import time

    from lcrun.process_files import process_tag

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tag = process_tag(killed.pid)
        killed.kill()
        killed.wait()
        stale = [out_dir / f".lcrun-intermediate-{dead_tag}.gguf", out_dir / f".lcrun-intermediate-{dead_tag}.gguf.partial"]
        kept = out_dir / f".lcrun-intermediate-{process_tag(live.pid)}.gguf"
        older = out_dir / ".lcrun-intermediate-4000000.gguf"   # an older lcrun's name: gone once an hour old
        for path in [*stale, kept, older]:
            path.write_bytes(b"\0" * 4096)
        os.utime(older, (time.time() - 7200, time.time() - 7200))
        synced_dirs: list[int] = []
        fsync = os.fsync

        def spying(fd: int) -> None:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                synced_dirs.append(st.st_ino)
            fsync(fd)

        monkeypatch.setattr(os, "fsync", spying)
        run = invoke("convert", str(ckpt), "-o", str(out_dir / "m.gguf"), "--outtype", "Q4_K_M")
        assert run.exit_code == 0, run.stderr
        assert leftovers(out_dir) == sorted(["m.gguf", kept.name])
        assert out_dir.stat().st_ino in synced_dirs
    finally:
        live.kill()
        live.wait()
