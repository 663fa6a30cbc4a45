"""`lcrun chat` once the plan is made: load the engine, restore a --session, add --file documents, then answer one -p
prompt or run the interactive loop; save the session on the way out."""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from lcrun.chat.formats import FormatChoice
from lcrun.chat.history import History, default_history_path
from lcrun.chat.session import ChatSession, Notice, kv_state_path
from lcrun.errors import EngineError
from lcrun.generation.records import Finished, PrefillProgress, TextChunk
from lcrun.launch import Launch

from .chat_repl import ChatRepl, show_events, sigint_cancels
from .model_loading import load_engine


def chat_with_engine(launch: Launch, chat_format: FormatChoice | None, options: Any, question: str | None,
                     out: Any, err: Any) -> int:
    path = launch.model_path
    one_shot = question is not None
    engine = load_engine(err, launch.config)
    session: ChatSession | None = None
    try:
        history = None if options.no_history else History(options.history_file or default_history_path())
        session = ChatSession(
            engine, chat_format=chat_format, system=options.system, params=options.params, history=history,
            model_name=path.name, session_path=options.session_file,
        )
        view = err if one_shot else out
        if options.session_file is not None and options.session_file.exists():
            _restore(session, engine, options.session_file, view)
        if options.system is not None:
            session.set_system(options.system)
        for document in options.documents:
            check = session.check_document(document)
            view.print(f"{check.name}: {check.tokens:,} tokens", highlight=False)
            cancel = threading.Event()
            with sigint_cancels(cancel):
                show_events(session.add_document(check, cancel), view, label=f"reading {check.name}")
            if cancel.is_set():
                return 130
        if one_shot:
            assert question is not None
            return _answer_once(session, question, err)
        ChatRepl(session, out, _reader(), on_exit=lambda: _save(session, engine, options.session_file, out)).run()
        return 0
    finally:
        if one_shot:
            _save(session, engine, options.session_file, err)
        engine.close()


def _reader():  # type: ignore[no-untyped-def]
    from .chat_input import make_reader

    return make_reader(default_history_path().with_name("input_history"))


def _answer_once(session: ChatSession, question: str, err) -> int:  # type: ignore[no-untyped-def]
    from .chat_view import PrefillBar

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


def _restore(session: ChatSession, engine, path: Path, console) -> None:  # type: ignore[no-untyped-def]
    session.load(path)
    kv = kv_state_path(path)
    restored = 0
    if kv.exists():
        try:
            restored = engine.load_state(kv)
        except EngineError as exc:
            console.print(f"[yellow]warning:[/] {exc}; the conversation will be prefilled again")
    console.print(f"session {path.name}: {len(session.conversation.messages)} message(s), "
                  f"{restored:,} tokens of KV cache restored", highlight=False)


def _save(session: ChatSession | None, engine, path: Path | None, console) -> None:  # type: ignore[no-untyped-def]
    if path is None or session is None:
        return
    session.save(path)
    engine.save_state(kv_state_path(path))
    console.print(f"[dim]session saved to {path} ({len(engine.cached_tokens):,} tokens of KV cache)[/]",
                  highlight=False)
