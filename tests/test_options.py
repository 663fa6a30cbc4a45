"""llama.cpp's option names are aliases of lcrun's: the same command with either spelling gives the same output. A
different value through the alias changes the output (so the alias is not silently ignored)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.cli import invoke


@pytest.fixture(scope="module")
def model(tiny_gguf: Path) -> Path:
    return tiny_gguf  # head_dim 32: quantized KV types are possible


def output(*args: str) -> dict:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


PLAN_ALIASES = [
    (["--ctx", "2k"], ["-c", "2k"], ["-c", "1k"]),
    (["--ctx", "2k"], ["--ctx-size", "2048"], ["--ctx-size", "1024"]),
    (["--gpu-layers", "0"], ["-ngl", "0"], None),
    (["--gpu-layers", "0"], ["--n-gpu-layers", "0"], None),
    (["--flash-attn", "off"], ["-fa", "off"], ["-fa", "on"]),
    (["--kv-type", "q8_0/q4_0", "--flash-attn", "on"], ["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"],
     ["-ctk", "q8_0", "-fa", "on"]),
    (["--kv-type", "q8_0/f16"], ["--cache-type-k", "q8_0"], ["--cache-type-v", "q8_0"]),
    (["--ubatch", "256"], ["-ub", "256"], ["-ub", "128"]),
    (["--ubatch", "256"], ["--ubatch-size", "256"], None),
    (["--parallel", "2"], ["-np", "2"], ["-np", "3"]),
]


@pytest.mark.parametrize(("ours", "theirs", "different"), PLAN_ALIASES)
@pytest.mark.parametrize("command", ["plan", "estimate"])
def test_llama_cpp_names_plan_the_same(model: Path, command: str, ours: list[str], theirs: list[str],
                                       different: list[str] | None) -> None:
    base = [command, str(model), "--ram", "8G", "--json"] + (["--ctx", "1k"] if command == "estimate" and
                                                           not any(a.startswith(("-c", "--ctx")) for a in ours)
                                                           else [])
    if command == "plan" and not any(a.startswith(("-c", "--ctx")) for a in ours):
        base += ["--ctx", "1k"]
    assert output(*base, *ours) == output(*base, *theirs)
    if different is not None:
        assert output(*base, *different) != output(*base, *theirs)


def test_kv_type_given_twice_is_refused(model: Path) -> None:
    result = invoke("plan", str(model), "--kv-type", "q8_0", "-ctk", "q4_0")
    assert result.exit_code == 2 and "give the KV cache type once" in result.stderr


def test_convert_aliases(tmp_path: Path) -> None:
    ours = invoke("convert", "demo", "--output", str(tmp_path / "a.gguf"), "--ctx", "32k", "--rope-theta", "1e6",
                  "--threads", "1", "-q")
    theirs = invoke("convert", "demo", "-o", str(tmp_path / "b.gguf"), "-c", "32768", "--rope-freq-base", "1000000",
                    "-t", "1", "-q")
    assert ours.exit_code == theirs.exit_code == 0, ours.output + theirs.output
    a, b = (tmp_path / "a.gguf").read_bytes(), (tmp_path / "b.gguf").read_bytes()
    assert a == b
    old = invoke("convert", "demo", "--out", str(tmp_path / "c.gguf"), "--ctx", "32768", "--rope-theta", "1000000", "-q")
    assert old.exit_code == 0 and (tmp_path / "c.gguf").read_bytes() == a
    other = invoke("convert", "demo", "-o", str(tmp_path / "d.gguf"), "-c", "16k", "-q")
    assert other.exit_code == 0 and (tmp_path / "d.gguf").read_bytes() != a


RUN_ALIASES = [
    (["--ctx", "2k"], ["-c", "2048"], ["-c", "4k"]),
    (["--ctx", "2k"], ["--ctx-size", "2k"], None),
    (["--kv-type", "q8_0/f16"], ["-ctk", "q8_0"], ["-ctv", "q8_0"]),
    (["--kv-type", "q4_0/q8_0"], ["--cache-type-k", "q4_0", "--cache-type-v", "q8_0"], None),
    (["--flash-attn", "on"], ["-fa", "on"], ["-fa", "off"]),
    (["--gpu-layers", "3"], ["-ngl", "3"], ["--n-gpu-layers", "2"]),
    (["--threads", "1"], ["-t", "1"], ["-t", "2"]),
    (["--ubatch", "128"], ["-ub", "128"], ["--ubatch-size", "256"]),
    (["--rope-theta", "1e6"], ["--rope-freq-base", "1000000"], ["--rope-freq-base", "2e6"]),
    (["--rope-scale", "4"], ["--rope-freq-scale", "0.25"], ["--rope-freq-scale", "0.5"]),
    (["--no-repack"], ["-nr"], ["--repack"]),
]


def _parsed(command: str, args: list[str]) -> dict:
    import importlib

    cmd = getattr(importlib.import_module(f"lcrun.{command}_cli"), command)
    return cmd.make_context(command, ["model.gguf", *args]).params


@pytest.mark.parametrize(("ours", "theirs", "different"), RUN_ALIASES)
@pytest.mark.parametrize("command", ["chat", "niah", "bench"])
def test_llama_cpp_names_give_the_same_run(command: str, ours: list[str], theirs: list[str],
                                          different: list[str] | None) -> None:
    from lcrun.cli_options import launch_options_from

    assert launch_options_from(_parsed(command, ours)) == launch_options_from(_parsed(command, theirs))
    if different is not None:
        assert launch_options_from(_parsed(command, different)) != launch_options_from(_parsed(command, theirs))


@pytest.mark.parametrize(("ours", "theirs"), [
    (["--ctx", "2k", "--kv-type", "q8_0/f16", "--flash-attn", "on"], ["-c", "2048", "-ctk", "q8_0", "-fa", "on"]),
    (["--gpu-layers", "0", "--threads", "1", "--ubatch", "256"], ["-ngl", "0", "-t", "1", "-ub", "256"]),
])
def test_chat_dry_run_plans_the_same(model: Path, ours: list[str], theirs: list[str]) -> None:
    a = invoke("chat", str(model), "--dry-run", "--ram", "8G", *ours)
    b = invoke("chat", str(model), "--dry-run", "--ram", "8G", *theirs)
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert a.stdout == b.stdout and "context 2,048" in invoke("chat", str(model), "--dry-run", "-c", "2k").stdout


@pytest.mark.parametrize("command", ["chat", "niah", "bench", "serve"])
def test_repacking_reaches_the_engine_config(model: Path, command: str) -> None:
    from lcrun.cli_options import launch_options_from
    from lcrun.launch.decide import decide_launch

    def config(*args: str) -> object:
        options = launch_options_from(_parsed(command, ["--ram", "8G", "-c", "1k", *args]))
        return decide_launch(options, model_path=model).config

    assert [config(*a).repack for a in ([], ["--repack"], ["--no-repack"], ["-nr"])] == [None, True, False, False]


def test_chat_and_niah_sampling_names() -> None:
    assert _parsed("chat", ["--seed", "3", "--max-tokens", "9", "--system", "x"]) == \
        _parsed("chat", ["-s", "3", "-n", "9", "-sys", "x"]) == _parsed("chat", ["-s", "3", "--n-predict", "9",
                                                                                  "--system-prompt", "x"])
    assert _parsed("chat", ["-n", "8"])["max_tokens"] == 8
    assert _parsed("niah", ["--seed", "5"]) == _parsed("niah", ["-s", "5"])
