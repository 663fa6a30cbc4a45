"""GGUFOutput starts the disk writing as data accumulates (posix_fadvise DONTNEED every WRITEBACK_BYTES) rather than
leaving all of it to commit's fsync; the file written that way is the same file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import lcrun.convert.gguf_out as gguf_out
from lcrun.convert.convert import convert_checkpoint
from tests.fixtures.checkpoint_factory import make_llama_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    make_llama_checkpoint(path, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, shards=1)
    return path


def _advice_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    calls: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((fd, offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return calls


@pytest.mark.parametrize("split", [0, 100_000])
def test_writeback_is_started_in_steps_and_the_file_is_unchanged(ckpt: Path, tmp_path: Path, split: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "once").mkdir()
    (tmp_path / "steps").mkdir()
    once = convert_checkpoint(ckpt, tmp_path / "once" / "m.gguf", outtype="f32", split_max_size=split)
    monkeypatch.setattr(gguf_out, "WRITEBACK_BYTES", 16 << 10)
    calls = _advice_spy(monkeypatch)
    steps = convert_checkpoint(ckpt, tmp_path / "steps" / "m.gguf", outtype="f32", split_max_size=split)

    assert [p.read_bytes() for p in steps.paths] == [p.read_bytes() for p in once.paths]
    assert {advice for *_, advice in calls} == {os.POSIX_FADV_DONTNEED}
    assert all(length >= 16 << 10 for _, _, length, _ in calls)
    ends: dict[int, int] = {}
    for fd, offset, length, _ in calls:  # each file's ranges follow on from each other, from its start
        assert offset == ends.get(fd, 0)
        ends[fd] = offset + length
    assert len(ends) == len(steps.paths) == (6 if split else 1)
    # together they cover all but the last < 16 KiB of each file
    total = sum(p.stat().st_size for p in steps.paths)
    assert total - len(steps.paths) * (16 << 10) < sum(ends.values()) <= total


def test_a_platform_refusing_the_advice_still_writes_the_file(ckpt: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_out, "WRITEBACK_BYTES", 16 << 10)

    def refuse(*_: Any) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    result = convert_checkpoint(ckpt, tmp_path / "m.gguf", outtype="f32")
    monkeypatch.undo()
    again = convert_checkpoint(ckpt, tmp_path / "again.gguf", outtype="f32")
    assert result.paths[0].read_bytes() == again.paths[0].read_bytes()
