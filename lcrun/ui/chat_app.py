"""`lcrun chat` from plan to exit: choose the chat format and show it with the plan (or only them, --dry-run), load
the engine, restore a --session, add --file documents, then answer one -p prompt or run the interactive loop; save
the session on the way out."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lcrun.chat.documents import read_document
from lcrun.chat.formats import FormatChoice, choose_format, header_vocabulary
from lcrun.chat.history import History, default_history_path
from lcrun.chat.session import ChatSession, Notice, kv_state_path
from lcrun.engine.runtime import Finished, PrefillProgress, Sampling, TextChunk
from lcrun.errors import EngineError, LcrunError
from lcrun.launch import RunOverrides, plan_launch

from .chat_repl import ChatRepl, show_events, sigint_cancels
from .chat_view import render_plan_panel
from .console import make_console
from .model_loading import load_engine, locate_model


@dataclass
class ChatOptions:
    prompt: str | None = None
    system: str | None = None
    documents: list[Path] = field(default_factory=list)
    temp: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int | None = None
    session_file: Path | None = None
    history_file: Path | None = None
    no_history: bool = False
    dry_run: bool = False
    chat_format: FormatChoice | None = None   # what the user asked for (--chat-template, --raw); None: the model's


def run_chat(model: str, hub_file: str | None, revision: str | None, overrides: RunOverrides,
             options: ChatOptions) -> int:
    out, err = make_console(), make_console(stderr=True)
    one_shot = options.prompt is not None
    question = _read_prompt(options.prompt) if one_shot else None
    for document in options.documents:
        read_document(document)  # a bad --file fails now, before the model loads
    path = locate_model(err, model, hub_file, revision)
    launch = plan_launch(path, overrides)
    chat_format = options.chat_format
    if launch.gguf is not None:  # decided from the header, before loading; else by the session from the engine
        chat_format = choose_format(header_vocabulary(launch.gguf.meta), chat_format)
    if options.dry_run:
        render_plan_panel(launch, out, chat_format=chat_format)
        return 0
    if one_shot:
        for warning in launch.warnings:
            err.print(f"warning: {warning}", highlight=False)
        if chat_format is not None:
            err.print(f"chat format: {chat_format.describe()}", style="dim", highlight=False, markup=False)
    else:
        render_plan_panel(launch, out, chat_format=chat_format)

    engine = load_engine(err, launch.config)
    session: ChatSession | None = None
    try:
        history = None if options.no_history else History(options.history_file or default_history_path())
        session = ChatSession(
            engine, chat_format=chat_format, system=options.system, max_tokens=options.max_tokens, history=history,
            model_name=path.name,
            sampling=Sampling(temperature=options.temp, top_p=options.top_p, top_k=options.top_k,
                              min_p=options.min_p, repeat_penalty=options.repeat_penalty, seed=options.seed),
            session_path=options.session_file,
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


def _read_prompt(prompt: str | None) -> str:
    text = sys.stdin.read() if prompt == "-" else (prompt or "")
    if not text.strip():
        raise LcrunError("-p", "the prompt is empty" + (" (nothing on stdin)" if prompt == "-" else ""))
    return text


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
