"""Hermetic tests: every user directory and the Hugging Face cache live under tmp_path, and the Hub is offline
unless a test starts the local fake Hub (tests/fixtures/hub_server.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


_EQUIVALENCE: dict[str, int] = {"compared": 0, "left_to_dedicated_tests": 0}


@pytest.fixture(autouse=True)
def _gguf_files_read_like_gguf_py(tmp_path: Path) -> Any:
    """Every GGUF a test leaves behind is read by lcrun's header reader and by gguf-py's GGUFReader: the same keys,
    values and tensor infos. Files either reader refuses (damaged on purpose) are the damage tests' business."""
    yield
    from lcrun.errors import GGUFFileError
    from lcrun.gguf_reader import read_gguf_header
    from tests.fixtures.gguf_equivalence import TEARDOWN_ELEMENT_LIMIT, array_elements, assert_same_as_gguf_reader

    for path in sorted(tmp_path.rglob("*.gguf")):
        if not path.is_file():
            continue
        try:
            ours = read_gguf_header(path)
        except GGUFFileError:
            continue
        if array_elements(ours) > TEARDOWN_ELEMENT_LIMIT:
            _EQUIVALENCE["left_to_dedicated_tests"] += 1
            continue
        assert_same_as_gguf_reader(path, ours)
        _EQUIVALENCE["compared"] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _EQUIVALENCE["compared"] or _EQUIVALENCE["left_to_dedicated_tests"]:
        terminalreporter.write_line(
            f"GGUF header reader vs gguf-py GGUFReader: {_EQUIVALENCE['compared']} files the tests built compared, "
            f"{_EQUIVALENCE['left_to_dedicated_tests']} with big vocabularies left to tests/test_gguf_reader.py")


from tests.fixtures.engines import engines  # noqa: E402,F401  (the one way tests put engines into the launch)
from tests.fixtures.vocab_files import llama3_gguf, llama3_vocab  # noqa: E402,F401  (one 128K-vocabulary file a session)
from tests.fixtures.hub_server import fake_hub  # noqa: E402,F401  (the local stand-in for the Hub, as a fixture)
from tests.fixtures.tiny_gguf import demo_gguf_file, tiny_gguf  # noqa: E402,F401  (tiny real GGUFs, made once a session)


@pytest.fixture(autouse=True, scope="session")
def _llama_loads_weights_as_the_engine_does() -> None:
    from tests.fixtures.llama_peer import match_engine_weights

    match_engine_weights()
