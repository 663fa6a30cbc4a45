"""Built-in profiles: the facts of MODEL_FACTS.md, read through the converter's own adapters."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lcrun.models import find_profile, load_profiles
from lcrun.profiles import parameter_count, profile_adapter
from tests.fixtures.cli import invoke

REQUIRED = {"gradientai/Llama-3-8B-Instruct-Gradient-1048k", "gradientai/Llama-3-70B-Instruct-Gradient-1048k",
            "gradientai/Llama-3-8B-Instruct-262k", "gradientai/Llama-3-70B-Instruct-Gradient-262k",
            "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct",
            "meta-llama/Llama-3.1-405B-Instruct"}


def test_the_required_profiles_are_there() -> None:
    assert REQUIRED <= {p.repo_id for p in load_profiles()}


@pytest.mark.parametrize(("name", "tensors", "billions"), [
    ("llama-3.1-8b", 292, 8.03), ("gradient-8b-1048k", 291, 8.03), ("llama-3.1-70b", 724, 70.55),
    ("gradient-70b-262k", 723, 70.55), ("llama-3.1-405b", 1138, 405.85)])
def test_tensor_and_parameter_counts(name: str, tensors: int, billions: float) -> None:
    adapter = profile_adapter(find_profile(name))
    assert len(adapter.gguf_tensors()) == tensors  # a correct Llama-3.1-8B GGUF has 292 tensors (rope_freqs)
    assert round(parameter_count(adapter) / 1e9, 2) == billions


def test_llama_3_1_rope_freqs_match_model_facts() -> None:
    adapter = profile_adapter(find_profile("meta-llama/Llama-3.1-8B"))
    [rope_freqs] = [p.data for p in adapter.extra_tensors()]
    expected = [1.0] * 29 + [1.2075, 1.5534, 2.0263, 2.6945, 3.6843, 5.2573] + [8.0] * 29
    np.testing.assert_allclose(rope_freqs, expected, atol=5e-5)


def test_gradient_theta_and_context() -> None:
    adapter = profile_adapter(find_profile("GRADIENTAI/llama-3-70b-instruct-gradient-1048k"))
    assert adapter.rope.kind == "none" and adapter.rope.theta == 3580165449.0
    assert adapter.context_length == 1048576 and adapter.n_head_kv == 8 and adapter.head_dim == 128
    assert find_profile("no/such-model") is None


def test_models_command_lists_every_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    run = invoke("models", "--json")
    assert run.exit_code == 0, run.stderr
    listed = json.loads(run.stdout)
    assert {p["repo_id"] for p in listed} == {p.repo_id for p in load_profiles()}
    for name in ("COLUMNS", "LINES"):  # a pipe: no width imposed
        monkeypatch.delenv(name, raising=False)
    table = invoke("models")
    assert table.exit_code == 0, table.stderr
    for profile in load_profiles():
        assert profile.name in table.stdout and profile.repo_id in table.stdout
