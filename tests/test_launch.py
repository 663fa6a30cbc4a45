"""The one launch (lcrun.launch): options parsed once into a typed record, decided (file, plan, chat format,
EngineConfig) without an engine, then opened into a LoadedModel that owns its engine — on the tiny real GGUF, with
llama.cpp, and with the one injection point tests use instead of patching the engine module."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lcrun.chat_cli import chat
from lcrun.cli_options import launch_options_from
from lcrun.launch.decide import decide_launch, no_larger_than_needed
from lcrun.launch.loaded import LoadedModel, open_model, set_engine_factory
from lcrun.launch.options import LaunchOptions
from tests.fixtures.engines import Engines


def test_ctx_walks_down_from_the_command_line_to_llama_cpps_context(tiny_gguf: Path) -> None:
    params = chat.make_context("chat", [str(tiny_gguf), "-c", "1k", "-ctk", "q8_0", "-fa", "on", "-t", "1"]).params
    options = launch_options_from(params)
    assert (options.ctx, options.kv_type, options.threads) == (1024, "q8_0/f16", 1)
    launch = decide_launch(options)
    assert launch.choice.estimate.ctx == launch.config.n_ctx == 1024 and launch.config.type_k == "q8_0"
    with open_model(launch) as model:   # llama.cpp's own figure for the context it made
        assert isinstance(model, LoadedModel) and model.engine.n_ctx == 1024
        assert model.chat_format is not None and model.chat_format.kind == "jinja"
    other = decide_launch(launch_options_from({**params, "ctx": 2048}))
    assert other.config.n_ctx == 2048   # negative control: the value is carried, not a constant


def test_a_loaded_model_closes_its_engine_however_the_block_ends(tiny_gguf: Path, engines: Engines) -> None:
    with pytest.raises(KeyboardInterrupt), open_model(LaunchOptions(str(tiny_gguf), ctx=512)) as model:
        assert model.engine is engines[0] and not engines[0].closed
        raise KeyboardInterrupt
    assert engines[0].closed
    assert engines.configs[0].n_ctx == 512 and engines.configs[0].model_path == tiny_gguf


def test_no_larger_than_needed_replans_only_what_the_user_left_open(tiny_gguf: Path) -> None:
    widest = decide_launch(LaunchOptions(str(tiny_gguf), ram=8 << 30))
    assert widest.config.n_ctx == widest.spec.n_ctx_train
    assert no_larger_than_needed(widest, 300).config.n_ctx == 512
    forced = decide_launch(LaunchOptions(str(tiny_gguf), ctx=1536, ram=8 << 30))
    assert no_larger_than_needed(forced, 300) is forced


def test_a_run_that_does_not_chat_has_no_chat_format(tiny_gguf: Path) -> None:
    assert decide_launch(LaunchOptions(str(tiny_gguf), chat=False)).chat_format is None


def test_the_injection_point_is_put_back(engines: Engines) -> None:
    made = engines.make
    assert set_engine_factory(None) == made      # the fixture's factory is the one in place
    assert set_engine_factory(made) is None


def test_chat_dry_run_imports_no_engine(tiny_gguf: Path) -> None:
    code = ("import sys; from lcrun.cli import main\n"
            "try:\n    main(['chat', sys.argv[1], '--dry-run'])\nexcept SystemExit:\n    pass\n"
            "loaded = [m for m in ('llama_cpp', 'lcrun.engine.runtime', 'lcrun.chat.session', 'lcrun.launch.loaded')"
            " if m in sys.modules]\nprint('loaded:', loaded)")
    run = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "context 2,048 tokens" in run.stdout, run.stderr
    assert run.stdout.strip().endswith("loaded: []")
