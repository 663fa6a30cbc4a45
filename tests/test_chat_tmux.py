"""`lcrun chat` end to end in a real terminal: the real CLI and the real llama.cpp engine run inside a detached tmux
pane (80x24, TERM=xterm-256color, NO_COLOR unset, so prompt_toolkit reads the input and rich streams the Markdown),
driven with send-keys and read back with capture-pane. One session: a turn, /ctx, Ctrl-C in the middle of a reply,
one more turn, /quit — then the exit status, the screen and the JSONL transcript are checked."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import pytest
from rich.console import Console
from rich.markdown import Markdown
from rich.text import Text

from lcrun.convert.convert import convert_checkpoint
from tests.fixtures.checkpoint_factory import make_llama_checkpoint
from tests.fixtures.safetensors_writer import save_safetensors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed: this test drives lcrun chat "
                                                            "in a real terminal through tmux"),
]

WIDTH, HEIGHT = 80, 24
# Long enough that a reply streams for seconds (the model below writes a few hundred tokens a second on one thread,
# fewer as the context fills), short enough that the whole test stays well under a minute.
MAX_TOKENS = 600
TIMEOUT_S = 30.0


def _lcrun() -> list[str]:
    """The installed console script beside this interpreter, or the same entry point through it."""
    script = Path(sys.executable).with_name("lcrun")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from lcrun.cli import main; main()"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama big enough that a reply streams for seconds (hidden 512, 8 layers) and that never ends a reply
    by itself: its lm_head rows for the end-of-generation tokens are zero, so their logit (0) never reaches the top
    of the sampled ones, and every reply runs to --max-tokens or to Ctrl-C whatever the platform's numerics."""
    root = tmp_path_factory.mktemp("tmux-model")
    checkpoint = make_llama_checkpoint(root / "ckpt", hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536,
                                       max_position_embeddings=8192, rope_theta=500000.0, shards=1)
    added = json.loads((checkpoint.path / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    end_ids = [t["id"] for t in added if t["content"] in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    stored = {name: value.astype(ml_dtypes.bfloat16) for name, value in checkpoint.weights.items()}
    stored["lm_head.weight"][end_ids] = 0
    save_safetensors(checkpoint.path / "model.safetensors", stored, {"format": "pt"})
    return convert_checkpoint(checkpoint.path, root / "m512.gguf", outtype="f16").paths[0]


class Pane:
    """One tmux server on its own socket, one session, one pane running a command through /bin/sh, which writes the
    command's exit status to a file: tmux 3.3 can miss the exit of a multi-threaded child (its pane shows dead, its
    status never comes), so #{pane_dead_status} is not to be relied on."""

    def __init__(self, root: Path, command: list[str]) -> None:
        self.socket = root / "tmux.sock"
        self.status_file = root / "exit-status"
        conf = root / "tmux.conf"
        # remain-on-exit: the screen can still be read once the command has exited
        conf.write_text("set -g default-shell /bin/sh\nset -g remain-on-exit on\nset -g history-limit 50000\n"
                        f"set -g default-size {WIDTH}x{HEIGHT}\nset -g status off\n")
        self.env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        self.base = ["tmux", "-S", str(self.socket), "-f", str(conf)]
        # the shell traps SIGINT so that Ctrl-C reaches only lcrun (a trap is reset in the child, an ignore is not)
        script = f"trap : INT; {shlex.join(command)}; echo $? > {shlex.quote(str(self.status_file))}"
        self.tmux("new-session", "-d", "-s", "chat", "-x", str(WIDTH), "-y", str(HEIGHT), script)

    def tmux(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, f"tmux {' '.join(args)} failed: {done.stderr}"
        return done.stdout

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "chat", "-l", text)
        self.tmux("send-keys", "-t", "chat", "Enter")

    def lines(self) -> list[str]:
        """Everything the pane has shown, scrollback included, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-E", "-", "-t", "chat").split("\n")

    def wait_for(self, what: str, found: Callable[[list[str]], Any]) -> Any:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            lines = self.lines()
            result = found(lines)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the pane shows:\n" + "\n".join(lines))
            time.sleep(0.05)

    def exit_status(self) -> int | None:
        text = self.status_file.read_text() if self.status_file.exists() else ""
        return int(text) if text.strip() else None

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], env=self.env, capture_output=True, timeout=10)


def _after(lines: list[str], prompt_line: str) -> list[str] | None:
    """The lines after the last `> prompt_line` input line, None before it shows."""
    starts = [i for i, line in enumerate(lines) if line.rstrip() == f"> {prompt_line}"]
    return lines[starts[-1] + 1:] if starts else None


def _status_line(lines: list[str], question: str) -> tuple[list[str], str] | None:
    """(the reply's lines, its final status line) once the turn after `question` has finished."""
    below = _after(lines, question) or []
    for i, line in enumerate(below):
        if line.startswith("ctx ") and "TTFT" in line:
            status = line.rstrip()
            if status.endswith("·") and i + 1 < len(below):  # wider than the screen: rich wrapped it
                status += " " + below[i + 1].strip()
            return below[:i], status
    return None


def _streamed(lines: list[str], question: str) -> int | None:
    """How much of the context is in use on the live status line ("ctx 1,234/4,096 …") of the reply to `question`
    while it streams; -1 once the reply has finished; None before it starts."""
    if _status_line(lines, question):
        return -1
    for line in _after(lines, question) or []:
        if match := re.match(r"ctx ([\d,]+)/", line):
            return int(match[1].replace(",", ""))
    return None


def _normal(lines: list[str]) -> list[str]:
    """Lines as cells on a screen: control and format characters (which take no cell) dropped, right-stripped; blank
    lines at either end dropped."""
    out = ["".join(c for c in line if unicodedata.category(c) not in ("Cc", "Cf")).rstrip() for line in lines]
    while out and not out[0]:
        out.pop(0)
    while out and not out[-1]:
        out.pop()
    return out


def _rendered(reply: str) -> list[str]:
    """The reply as Markdown at the stream's width, rendered once, whole: what the screen must show, each line once."""
    sink = Console(file=io.StringIO(), width=WIDTH - 1, force_terminal=True, color_system="standard",
                   highlight=False)
    sink.print(Markdown(reply))
    return _normal(Text.from_ansi(sink.file.getvalue()).plain.split("\n"))  # type: ignore[attr-defined]


def test_chat_session_in_a_real_terminal(model: Path, tmp_path: Path) -> None:
    home = tmp_path / "_home"
    history = tmp_path / "transcript.jsonl"
    command = [
        "env", "-u", "NO_COLOR", "-u", "COLUMNS", "-u", "LINES", "TERM=xterm-256color", f"HOME={home}",
        f"XDG_DATA_HOME={home / '.local' / 'share'}", f"XDG_CACHE_HOME={home / '.cache'}",
        f"XDG_CONFIG_HOME={home / '.config'}", f"HF_HOME={home / 'hf'}", "HF_HUB_OFFLINE=1",
        # one thread: the same pace on a busy machine; sampled, not greedy: a random model's greedy reply is one
        # run with hardly a line break, a sampled one breaks lines, so the stream settles lines as it goes
        *_lcrun(), "chat", str(model), "--ctx", "4096", "--threads", "1", "--temp", "0.8", "--seed", "0",
        "--max-tokens", str(MAX_TOKENS), "--history", str(history),
    ]
    pane = Pane(tmp_path, command)
    try:
        pane.wait_for("the input prompt", lambda lines: any(line.rstrip() == ">" for line in lines))
        screen = "\n".join(pane.lines())
        assert "m512.gguf" in screen and "context 4,096 tokens" in screen  # the plan panel

        # 1. a whole turn
        first = "What is the capital of France?"
        pane.type(first)
        _reply, status = pane.wait_for("the first reply's status line", lambda lines: _status_line(lines, first))
        assert "tok/s" in status and "length limit" in status, status

        # 2. /ctx
        pane.type("/ctx")
        pane.wait_for("the /ctx breakdown", lambda lines: (below := _after(lines, "/ctx")) is not None
                      and any(line.startswith("free ") for line in below))
        ctx = "\n".join(_after(pane.lines(), "/ctx") or [])
        assert "prompt now" in ctx and "turns (1)" in ctx and "in the KV cache" in ctx, ctx

        # 3. Ctrl-C while the reply streams
        second = "Tell me a long story about the sea."
        pane.type(second)
        # well into the reply: 150 tokens past its first live status line, far from its end at 600
        start = pane.wait_for("the second reply to stream", lambda lines: _streamed(lines, second))
        now = pane.wait_for("150 more tokens of the second reply",
                            lambda lines: (n := _streamed(lines, second)) is not None and (n < 0 or n >= start + 150))
        assert start > 0 and now > 0, "the reply ended before it could be interrupted"
        pane.tmux("send-keys", "-t", "chat", "C-c")
        _reply, status = pane.wait_for("the stopped reply's status line", lambda lines: _status_line(lines, second))
        assert "stopped" in status, f"the reply was not cut by Ctrl-C: {status}"

        # 4. the session goes on
        third = "Thanks! One more, please."
        pane.type(third)
        _reply, status = pane.wait_for("the third reply's status line", lambda lines: _status_line(lines, third))
        assert "stopped" not in status

        # 5. /quit: lcrun exits 0
        pane.type("/quit")
        pane.wait_for("lcrun to exit", lambda _lines: pane.exit_status() is not None)
        lines = pane.lines()
        assert pane.exit_status() == 0, "\n".join(lines)
    finally:
        pane.close()

    # the transcript: one JSON line per finished turn, the interrupted one marked cancelled
    records = [json.loads(line) for line in history.read_text(encoding="utf-8").splitlines()]
    assert [r["user"] for r in records] == [first, second, third]
    assert [r["finish_reason"] for r in records] == ["length", "cancelled", "length"]
    assert records[0]["completion_tokens"] == MAX_TOKENS
    assert 150 <= records[1]["completion_tokens"] < MAX_TOKENS
    assert all(r["assistant"].strip() for r in records)

    # the screen: each reply exactly as Markdown renders it whole — settled lines printed once, the live tail erased
    for record in records:
        reply, _status = _status_line(lines, record["user"])  # type: ignore[misc]
        expected = _rendered(record["assistant"])
        if record is records[0]:  # longer than the live tail (6 lines), or no line is ever settled
            assert len(expected) > 8, expected
        assert _normal(reply) == expected, (f"the reply to {record['user']!r} on screen differs from its rendering:\n"
                                            + "\n".join(reply) + "\n--- expected ---\n" + "\n".join(expected))
