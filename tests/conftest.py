"""Hermetic tests: every user directory and the Hugging Face cache live under tmp_path, and the Hub is offline
unless a test starts the local fake Hub (tests/fixtures/hub_server.py)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _hermetic_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "_home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("LCRUN_DEBUG", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


from tests.fixtures.hub_server import fake_hub  # noqa: E402,F401  (the local stand-in for the Hub, as a fixture)
