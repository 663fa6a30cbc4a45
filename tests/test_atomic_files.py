"""lcrun.atomic_files, the one atomic write of the application (sessions, niah summaries and pictures, the disk prompt
cache, re-quantized GGUFs): a file is whole under its name or not there, and a failure leaves no `.partial` behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from lcrun.atomic_files import atomic_output, write_atomic
from lcrun.errors import LcrunError
from lcrun.serve.prompt_cache import PromptCacheError
from tests.fixtures.one_line_errors import assert_one_line_message


def test_text_bytes_and_pieces_are_written_whole(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_atomic(target, "première\n")
    assert target.read_bytes() == "première\n".encode()
    write_atomic(target, [b"head", b"", b"tail"])
    assert target.read_bytes() == b"headtail"
    assert not list(tmp_path.glob("*.partial"))


def test_a_failure_while_writing_keeps_the_old_file_and_leaves_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, [b"new first piece", "not bytes"])  # type: ignore[list-item]
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob("*.partial"))

    with pytest.raises(KeyboardInterrupt), atomic_output(target) as partial:
        partial.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and not partial.exists()


def test_a_file_written_by_someone_else_is_renamed_in(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    with atomic_output(target) as partial:
        assert partial.name == "model.gguf.partial" and not target.exists()  # nothing under the name until done
        partial.write_bytes(b"GGUF")
    assert target.read_bytes() == b"GGUF" and not partial.exists()


def test_an_unwritable_place_is_one_line_of_the_callers_type(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "x.json"
    with pytest.raises(LcrunError) as caught:
        write_atomic(missing, "{}")
    assert "cannot be written" in assert_one_line_message(caught.value, str(missing))
    with pytest.raises(PromptCacheError):
        write_atomic(missing, b"", error=PromptCacheError)
    write_atomic(missing, "{}", make_parents=True)   # the chat's --session creates its folder
    assert missing.read_text() == "{}"
