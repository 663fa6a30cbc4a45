"""What `lcrun chat` shows around its session: a restored `--session`, each `-f` document prefilled into the context,
the one answer of `-p` (the reply alone on stdout, its numbers on stderr — the documents' prefill counted in the
wait), the session saved on the way out."""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lcrun.chat.documents import DocumentPrefilled
from lcrun.chat.session import ChatEvent, ChatSession, Notice
from lcrun.chat.startup import Restored
from lcrun.documents import Document
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


@dataclass
class DocumentsPrefilled:
    """What adding the -f documents cost: the wait before the question is asked."""
    tokens: int = 0          # prompt tokens evaluated for them
    seconds: float = 0.0
    cancelled: bool = False


def _noting(events: Iterable[ChatEvent], done: list[DocumentPrefilled]) -> Iterator[ChatEvent]:
    for event in events:
        if isinstance(event, DocumentPrefilled):
            done.append(event)
        yield event


def add_documents(session: ChatSession, documents: Sequence[Document], console: Console) -> DocumentsPrefilled:
    """Each document checked against the context, then prefilled with a bar; stops at a Ctrl-C."""
    spent = DocumentsPrefilled()
    for document in documents:
        check = session.check_document(document)
        cancel = threading.Event()
        done: list[DocumentPrefilled] = []
        with sigint_cancels(cancel):
            show_events(_noting(session.add_document(check, cancel), done), console, label=f"prefill {check.name}")
        spent.tokens += sum(d.evaluated for d in done)
        spent.seconds += sum(d.seconds for d in done)
        if cancel.is_set():
            spent.cancelled = True
            break
    return spent


def answer_once(session: ChatSession, question: str, err: Console,
                documents: DocumentsPrefilled | None = None) -> int:
    """-p: the reply streamed to stdout as it comes, the prefill bar and the numbers on stderr; 130 if cancelled.
    The documents' prefill is part of the wait for the first token, and the numbers say so."""
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
        wait = finished.time_to_first_token_s
        of_it = ""
        if documents is not None and documents.tokens:
            wait += documents.seconds
            of_it = f" (the documents' {documents.tokens:,} tokens took {documents.seconds:.2f} s of it)"
        err.print(f"{finished.prompt_tokens:,} prompt tokens ({finished.reused_tokens:,} reused), "
                  f"{finished.completion_tokens:,} generated at {finished.gen_tokens_per_s:.1f} tok/s, "
                  f"time to first token {wait:.2f} s{of_it}, ended by {finished.reason}",
                  style="dim", highlight=False)
    return 130 if finished is None or finished.reason == "cancelled" else 0
