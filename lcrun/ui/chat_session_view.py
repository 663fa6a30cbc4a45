"""What `lcrun chat` shows around its session: a restored `--session`, each `--file` document read into the context,
the one answer of `-p` (the reply alone on stdout, its numbers on stderr), the session saved on the way out."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

from rich.console import Console

from lcrun.chat.session import ChatSession, Notice
from lcrun.chat.startup import Restored
from lcrun.generation.records import Finished, PrefillProgress, TextChunk

from .chat_repl import show_events, sigint_cancels
from .chat_view import PrefillBar


def render_restored(restored: Restored, path: Path, console: Console) -> None:
    if restored.problem is not None:
        console.print(f"[yellow]warning:[/] {restored.problem}; the conversation will be prefilled again")
    console.print(f"session {path.name}: {restored.messages} message(s), {restored.kv_tokens:,} tokens of KV cache "
                  "restored", highlight=False)


def render_saved(path: Path, kv_tokens: int, console: Console) -> None:
    console.print(f"[dim]session saved to {path} ({kv_tokens:,} tokens of KV cache)[/]", highlight=False)


def read_documents(session: ChatSession, documents: list[Path], console: Console) -> bool:
    """Each document checked against the context, then prefilled with a bar; False when Ctrl-C stopped one."""
    for document in documents:
        check = session.check_document(document)
        console.print(f"{check.name}: {check.tokens:,} tokens", highlight=False)
        cancel = threading.Event()
        with sigint_cancels(cancel):
            show_events(session.add_document(check, cancel), console, label=f"reading {check.name}")
        if cancel.is_set():
            return False
    return True


def answer_once(session: ChatSession, question: str, err: Console) -> int:
    """-p: the reply streamed to stdout as it comes, the prefill bar and the numbers on stderr; 130 if cancelled."""
    cancel = threading.Event()
    finished: Finished | None = None
    bar = PrefillBar(err, "prefill")
    wrote = False
    with sigint_cancels(cancel):
        for event in session.ask(question, cancel):
            if isinstance(event, TextChunk):
                if not wrote:
                    bar.stop()
                    wrote = True
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Finished):
                finished = event
            elif isinstance(event, PrefillProgress):
                bar.update(event.done, event.total)
            elif isinstance(event, Notice):
                err.print(event.text, highlight=False, markup=False)
    bar.stop()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if finished is not None:
        err.print(f"{finished.prompt_tokens:,} prompt tokens ({finished.reused_tokens:,} reused), "
                  f"{finished.completion_tokens:,} generated at {finished.gen_tokens_per_s:.1f} tok/s, "
                  f"time to first token {finished.time_to_first_token_s:.2f} s, ended by {finished.reason}",
                  style="dim", highlight=False)
    return 130 if finished is None or finished.reason == "cancelled" else 0
