"""The interactive chat loop: read a message or a /command, stream the reply, keep going. Ctrl-C during a reply
or a prefill stops it (the session stays); Ctrl-D or /quit leaves."""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lcrun.chat.commands import COMMANDS, UnknownCommand, literal_message, parse_command
from lcrun.chat.documents import DocumentPrefilled, DocumentTooLong
from lcrun.chat.session import ChatEvent, ChatSession, Notice, TurnStarted
from lcrun.documents import Document
from lcrun.errors import LcrunError
from lcrun.generation.records import Finished, PrefillProgress, TextChunk

from .chat_input import ReadLine, read_message
from .console import is_plain
from .chat_view import PrefillBar, make_stream, render_help, render_stats, render_usage, status_text
from .document_view import duration


@contextmanager
def sigint_cancels(cancel: threading.Event) -> Iterator[None]:
    """While the block runs, Ctrl-C sets `cancel` instead of raising: the engine stops between two tokens (or two
    prefill chunks) and leaves its cache consistent."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda _signum, _frame: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def show_events(events: Iterable[ChatEvent], console: Console, *, label: str = "prefill") -> Finished | None:
    """Render one turn's events: prefill bar, streamed reply, notices, the status line at the end."""
    stream = None
    finished: Finished | None = None
    prompt_tokens, n_ctx, generated, first_at = 0, 0, 0, None
    bar = PrefillBar(console, label)
    try:
        for event in events:
            if isinstance(event, TurnStarted):
                prompt_tokens, n_ctx = event.prompt_tokens, event.n_ctx
            elif isinstance(event, PrefillProgress):
                bar.update(event.done, event.total)
            elif isinstance(event, TextChunk):
                if stream is None:
                    bar.stop()
                    stream = make_stream(console)
                    first_at = time.perf_counter()
                generated += event.n_tokens
                stream.add(event.text)
                if n_ctx:
                    elapsed = time.perf_counter() - first_at if first_at else 0
                    rate = (generated - 1) / elapsed if elapsed > 0 and generated > 1 else None
                    stream.status(status_text(prompt_tokens + generated, n_ctx, tokens_per_s=rate,
                                              width=console.width))
            elif isinstance(event, Notice):
                style = "yellow" if event.level == "warning" else "cyan"
                console.print(f"[{style}]{escape(event.text)}[/]")
            elif isinstance(event, DocumentPrefilled):
                bar.stop()
                console.print(f"[cyan]{escape(_prefilled(event))}[/]")
            elif isinstance(event, Finished):
                finished = event
    finally:
        bar.stop()
        if stream is not None:
            stream.finish()
    if finished is not None and n_ctx:
        note = {"cancelled": "stopped", "length": "length limit"}.get(finished.reason, "")
        used = finished.prompt_tokens + finished.completion_tokens
        console.print(status_text(used, n_ctx, tokens_per_s=finished.gen_tokens_per_s or None,
                                  ttft_s=finished.time_to_first_token_s, reused=finished.reused_tokens, note=note,
                                  width=console.width),
                      style="dim", highlight=False)
    return finished


def _prefilled(event: DocumentPrefilled) -> str:
    took = f"{event.evaluated:,} tokens prefilled in {duration(event.seconds)}"
    if event.dropped:
        return f"dropped {event.name} ({event.tokens:,} tokens); what followed it: {took}"
    return f"{event.name} added: {event.tokens:,} tokens ({took}), pinned: never dropped to make room"


class ChatRepl:
    def __init__(self, session: ChatSession, console: Console, read_line: ReadLine, *,
                 read_document: Callable[[str], Document] | None = None,
                 fit_fix: Callable[[int, int], str] | None = None,
                 on_exit: Callable[[], None] | None = None) -> None:
        """`read_document`: how /add reads what it is given (the chat's --include/--exclude applied); `fit_fix`:
        the estimator's one line for a prompt of (tokens, reserve) on this model and machine, told with a document
        the context cannot hold."""
        self.session = session
        self.console = console
        self.read_line = read_line
        self.read_document = read_document
        self.fit_fix = fit_fix
        self.on_exit = on_exit

    def run(self) -> None:
        self.console.print("[dim]Type a message and press Enter; /help lists the commands, Ctrl-D leaves.[/]")
        try:
            while True:
                try:
                    line = read_message(self.read_line)
                except KeyboardInterrupt:
                    self.console.print("[dim](Ctrl-D or /quit leaves)[/]")
                    continue
                except EOFError:
                    break
                if not line.strip():
                    continue
                try:
                    command = parse_command(line)
                except UnknownCommand as exc:
                    self._error(str(exc))
                    continue
                if command is not None and command[0] == "quit":
                    break
                try:
                    if command is None:
                        self._turn(lambda cancel: self.session.ask(literal_message(line), cancel))
                    else:
                        self._command(*command)
                except KeyboardInterrupt:  # Ctrl-C outside a reply (reading a /file, writing a /save, …)
                    self.console.print("[dim](cancelled)[/]")
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def _error(self, message: str) -> None:
        self.console.print(f"[red]error:[/] {escape(message)}", highlight=False)

    def _turn(self, start: Callable[[threading.Event], Iterable[ChatEvent]], label: str = "prefill") -> None:
        cancel = threading.Event()
        try:
            with sigint_cancels(cancel):
                show_events(start(cancel), self.console, label=label)
        except LcrunError as exc:
            self._error(str(exc))

    def _command(self, name: str, arg: str) -> None:
        session, console = self.session, self.console
        try:
            if name == "help":
                render_help(COMMANDS, console)
            elif name == "clear":
                session.clear()
                console.print("conversation cleared (the system prompt stays)")
            elif name == "system":
                session.set_system(arg)
                console.print(f"system prompt set ({session.count(arg):,} tokens)" if arg.strip()
                              else "system prompt removed")
            elif name == "add":
                self._add(arg)
            elif name == "docs":
                self._docs()
            elif name == "drop":
                self._drop(arg)
            elif name == "ctx":
                render_usage(session.usage(), console)
            elif name == "stats":
                render_stats(session.stats, console)
            elif name == "save":
                path = self._path_arg(arg, "/save")
                session.save(path)
                console.print(f"saved {len(session.conversation.messages)} message(s) to {escape(str(path))}")
            elif name == "load":
                path = self._path_arg(arg, "/load")
                session.load(path)
                console.print(f"loaded {len(session.conversation.messages)} message(s) from {escape(str(path))}")
            elif name == "retry":
                self._turn(session.retry)
        except LcrunError as exc:
            self._error(str(exc))

    def _path_arg(self, arg: str, command: str) -> Path:
        if not arg:
            raise LcrunError(command, "needs a file path")
        return Path(arg).expanduser()

    def _add(self, arg: str) -> None:
        if not arg:
            raise LcrunError("/add", "needs a file, folder or URL")
        if self.read_document is None:
            from lcrun.documents import read_document as read
        else:
            read = self.read_document
        with self.console.status(f"reading {arg}…") if not is_plain(self.console) else nullcontext():
            document = read(arg)   # a failure is one line and leaves the conversation as it was
            try:
                check = self.session.check_document(document)
            except DocumentTooLong as exc:
                if self.fit_fix is None:
                    raise
                fix = self.fit_fix(exc.prompt_tokens, exc.reserve)
                raise LcrunError(exc.subject, f"{exc.problem}; to hold it, start again: {fix}") from None
        drops = f"; adding it drops the {check.drops_turns} oldest turn(s)" if check.drops_turns else ""
        self.console.print(f"{escape(document.name)}: {escape(document.about())}, {document.characters:,} "
                           f"characters — {check.tokens:,} tokens — fits ({check.used_after:,}/"
                           f"{self.session.n_ctx:,} of the context in use after it{drops})", highlight=False)
        self._turn(lambda cancel: self.session.add_document(check, cancel), label=f"prefill {check.name}")

    def _docs(self) -> None:
        entries = self.session.documents()
        if not entries:
            self.console.print("no documents (/add PATH adds one: a file, a folder or a URL)")
            return
        for entry in entries:
            about = f" — {escape(entry.about)}" if entry.about else ""
            self.console.print(f"{entry.number:>3}. {escape(entry.name)}{about} — {entry.tokens:,} tokens",
                               highlight=False)
        self.console.print(f"[dim]{sum(e.tokens for e in entries):,} tokens in all; /drop N takes one out[/]")

    def _drop(self, arg: str) -> None:
        if not arg.strip().isdigit():
            raise LcrunError("/drop", "needs the number /docs lists, e.g. /drop 2")
        number = int(arg)
        self._turn(lambda cancel: self.session.drop_document(number, cancel), label="prefill")
