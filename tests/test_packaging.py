"""The wheel, installed into a fresh virtualenv outside the repository, works: one import namespace `lcrun`,
with `lcrun.convert` and `lcrun.models` (including the demo checkpoint) mapped from convert/ and models/."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, cwd=tmp_path)
    wheel = next(dist.glob("lcrun-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # the dependencies (llama-cpp-python takes ~10 minutes to build) come from this environment's site-packages,
    # added as a plain path: this does not activate the repository's editable install
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    probe = subprocess.run(
        [str(py), "-c", "import lcrun, lcrun.convert.convert, lcrun.models, lcrun.cli, lcrun.niah.ruler.run;"
                        "print(lcrun.__file__); print(lcrun.models.demo_checkpoint())"],
        check=True, cwd=workdir, env=env, capture_output=True, text=True)
    lcrun_file, demo_dir = probe.stdout.split()
    assert Path(lcrun_file).is_relative_to(site), lcrun_file
    assert Path(demo_dir).is_relative_to(site) and (Path(demo_dir) / "config.json").is_file()

    out = workdir / "demo.gguf"
    run = subprocess.run([str(venv / "bin" / "lcrun"), "convert", "demo", "-o", str(out), "--quiet"],
                         cwd=workdir, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and out.stat().st_size > 0

    # the chat, the niah grid (with the haystack shipped as package data) and the bench run from the wheel
    lcrun = str(venv / "bin" / "lcrun")
    chat = subprocess.run([lcrun, "chat", str(out), "-p", "Hello", "--max-tokens", "4", "--no-history"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    niah = subprocess.run([lcrun, "niah", str(out), "--min-ctx", "200", "--max-ctx", "300", "--ctx-steps", "1",
                           "--depth-interval", "1", "-o", str(workdir / "niah.jsonl"), "--json"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    assert niah.returncode == 0, niah.stderr
    assert (workdir / "niah.jsonl").read_text().count("\n") >= 2
    bench = subprocess.run([lcrun, "bench", str(out), "--depth", "0", "--pp", "64", "--tg", "4", "-r", "1", "--json"],
                           cwd=workdir, env=env, capture_output=True, text=True)
    assert bench.returncode == 0 and '"results"' in bench.stdout, bench.stderr
