"""`lcrun chat`: parse into the launch's options and the chat's, decide the launch (and show it: --dry-run ends
there, having imported no engine), open the model, then either answer one prompt (-p) or run the interactive loop."""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli_options import chat_format_options, launch_options
from .engine.protocol import Sampling

DEFAULTS = Sampling()   # the one source of the sampling defaults (llama.cpp's), shared with `lcrun serve`

if TYPE_CHECKING:
    from .chat.startup import ChatOptions
    from .documents import Document
    from .launch.decide import Launch
    from .launch.options import LaunchOptions


@click.command(epilog="""\b
Examples:
  lcrun chat demo                                        # the built-in tiny model (gibberish, no download)
  lcrun chat Llama-3.1-8B-Instruct-Q4_K_M.gguf -f contract.pdf   # context sized to the PDF (--ctx auto)
  lcrun chat model.gguf -f paper.pdf --dry-run                   # its tokens and the plan, nothing loaded
  lcrun chat model.gguf -p "Summarise this" -f report.docx > summary.md
  lcrun chat model.gguf -f ./src --include '*.py' -p "Where is the config parsed?"
  git diff | lcrun chat model.gguf -p - --system "Review this diff"
  curl -s https://example.com/a.pdf | lcrun chat model.gguf -f - -p "Summarise it"
  lcrun chat bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M       # a Hub GGUF repo, as llama.cpp's -hf
  lcrun chat model.gguf -f book.epub --session book.session      # reopen later without the prefill
  lcrun chat model.gguf --chat-template chatml                   # a llama.cpp format instead of the file's
  lcrun chat model.gguf --chat-template my-template.jinja        # a Jinja template of yours (sandboxed)
  lcrun chat --chat-template list                                # llama.cpp's built-in format names
  lcrun chat base-model.gguf --raw -p "Once upon a time"         # a base model: continue plain text
  lcrun chat base-model.gguf --raw -p "Q: 2+2? A:" --stop "Q:"  # end the reply before the next question
""")
@click.argument("model")
@click.option("-f", "--file", "files", multiple=True, metavar="FILE|DIR|URL|-",
              help="A document to put in the context before the conversation (repeatable, kept in this order): "
                   "text, Markdown, source, PDF, HTML, DOCX, EPUB, a folder or git checkout, an http(s) URL, or - "
                   "(stdin). Counted with the model's tokenizer before loading; without -c the context is sized to "
                   "them. `lcrun read` shows the text the model gets.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="In -f folders, read only files matching GLOB (gitignore syntax, repeatable), e.g. '*.py'.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="In -f folders, leave out files matching GLOB (gitignore syntax, repeatable), e.g. 'tests/**'.")
@launch_options(file_flag_free=True)
@chat_format_options
@click.option("-p", "--prompt", help="Answer this one prompt and exit: the answer alone on stdout, stats on "
                                     "stderr. `-p -` reads it from stdin.")
@click.option("-sys", "--system", "--system-prompt", "system", help="System prompt.")
@click.option("--temp", type=float, default=DEFAULTS.temperature, show_default=True,
              help="Temperature (0 = greedy).")
@click.option("--top-p", type=float, default=DEFAULTS.top_p, show_default=True)
@click.option("--top-k", type=int, default=DEFAULTS.top_k, show_default=True)
@click.option("--min-p", type=float, default=DEFAULTS.min_p, show_default=True)
@click.option("--repeat-penalty", type=float, default=DEFAULTS.repeat_penalty, show_default=True)
@click.option("--presence-penalty", type=float, default=DEFAULTS.presence_penalty, show_default=True,
              help="Subtracted from a token's logit once it appeared in the last 64 tokens.")
@click.option("--frequency-penalty", type=float, default=DEFAULTS.frequency_penalty, show_default=True,
              help="Subtracted from a token's logit for each time it appeared in the last 64 tokens.")
@click.option("-s", "--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=int,
              help="Longest reply in tokens (default: until the model stops or the context is full).")
@click.option("--stop", "-r", "--reverse-prompt", "stops", multiple=True, metavar="TEXT",
              help="End the reply before TEXT when the model writes it (repeatable; llama.cpp's -r/--reverse-prompt, "
                   "OpenAI's `stop`: the text is not shown). E.g. --stop 'User:' --stop '###'.")
@click.option("--session", "session_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the conversation and its KV cache here on exit (llama.cpp state file beside it, .kv) and "
                   "restore them when it exists: a long document is not prefilled twice.")
@click.option("--history", "history_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL transcript to append finished turns to (default: history.jsonl in the user data dir).")
@click.option("--no-history", is_flag=True, help="Keep no transcript.")
@click.option("--dry-run", is_flag=True, help="Show the plan (and the documents' table) and exit without loading the "
                                             "model.")
def chat(launch: LaunchOptions, files: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...],
         prompt: str | None, system: str | None, temp: float,
         top_p: float, top_k: int, min_p: float, repeat_penalty: float, presence_penalty: float,
         frequency_penalty: float, seed: int, max_tokens: int | None, stops: tuple[str, ...],
         session_file: Path | None, history_file: Path | None, no_history: bool, dry_run: bool) -> None:
    """Chat with MODEL (a GGUF file, `demo`, or a Hub GGUF repo as org/repo[:QUANT]), sized to this machine.

    The planner picks context, KV cache type, flash attention and GPU layers from the memory that is free; every
    choice can be forced. Documents (-f) are counted with the model's own tokenizer before it loads and shown in a
    table; without -c the context is sized to them (--ctx auto), and what cannot fit is refused with the flags
    that would fit it. They stay pinned before the conversation and their prefill is reused across turns
    (/add, /docs, /drop in the chat). The chat format is the file's own template, else the one its special tokens
    belong to, else ChatML (as llama.cpp); the plan says which, and why.
    """
    from .chat.formats import RAW
    from .chat.startup import ChatOptions
    from .errors import LcrunError
    from .generation.records import GenerationParams, RequestError

    if launch.chat_format == RAW and prompt is None and not dry_run:
        raise click.UsageError("--raw continues one prompt as plain text: give the prompt with -p (the interactive "
                               "chat needs a chat format)")
    params = GenerationParams(
        Sampling(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed),
        max_tokens=max_tokens, stop=stops)
    try:
        params.check()  # before the model loads
    except RequestError as exc:
        raise LcrunError("--" + exc.param.replace("_", "-"), exc.problem) from None
    options = ChatOptions(
        prompt=prompt, system=system, documents=list(files), include=include, exclude=exclude, params=params,
        session_file=session_file, history_file=history_file, no_history=no_history, dry_run=dry_run,
    )
    code = _run(launch, options)
    if code:
        sys.exit(code)


def _run(options: LaunchOptions, chat: ChatOptions) -> int:
    """Up to the plan: the prompt and documents read, the launch decided and, with documents, sized to them (their
    tokens counted with the vocabulary alone). Nothing here loads the engine or imports the session, so --dry-run
    starts fast."""
    from .chat.startup import peek_session, read_chat_documents, read_question
    from .launch.decide import decide_launch, no_larger_than_needed
    from .ui.console import make_console
    from .ui.document_view import reading_status, render_documents
    from .ui.launch_view import render_launch, render_launch_notes
    from .ui.model_loading import download_progress

    out, err = make_console(), make_console(stderr=True)
    reading = reading_status(err)
    question = read_question(chat)
    with reading("reading the documents…"):
        documents = read_chat_documents(chat)   # before a download: a bad file costs nothing
    with download_progress(err) as download:
        launch = decide_launch(options, download=download)
    saved = peek_session(chat.session_file)
    plan = None
    if documents:
        from .chat.document_plan import plan_documents

        with reading("counting tokens…"):
            launch, plan = plan_documents(launch, documents, system=chat.system, question=question,
                                          max_tokens=chat.params.max_tokens, saved=saved)
    elif saved is not None and options.ctx is None and saved[1] <= launch.choice.estimate.ctx:
        launch = no_larger_than_needed(launch, saved[1])   # the context its KV cache was saved at
    if chat.dry_run or question is None:
        render_launch(launch, out)
    else:
        render_launch_notes(launch, err)
    if plan is not None:
        render_documents(plan, out if chat.dry_run or question is None else err)
    if chat.dry_run:
        return 0
    return _chat(launch, chat, documents, question, out, err, plan.fragments if plan is not None else {})


def _chat(launch: Launch, chat: ChatOptions, documents: list[Document], question: str | None, out: Any,
          err: Any, fragments: Mapping[str, Any]) -> int:
    """The model loaded, the session restored and the documents prefilled, then -p's answer or the interactive
    loop; the session saved on the way out."""
    from functools import partial

    from .chat.documents import already_held
    from .chat.startup import read_one_document, restore_session, save_session, start_session
    from .launch.loaded import open_model
    from .launch.sizing import fix_for
    from .ui.chat_session_view import add_documents, answer_once, render_restored, render_saved
    from .ui.model_loading import loading_status

    view = out if question is None else err
    session_file = chat.session_file

    def save() -> None:
        if session_file is not None:
            render_saved(session_file, save_session(session, session_file), view)

    with open_model(launch, loading=loading_status(err)) as model:
        session = start_session(model, chat)
        session.tokenize.learn(fragments)   # the documents as counted before loading: the same vocabulary
        try:
            if session_file is not None and session_file.exists():
                render_restored(restore_session(session, session_file), session_file, view)
            if chat.system is not None:
                session.set_system(chat.system)
            new = [d for d in documents if not already_held(session.conversation.messages, d)]
            spent = add_documents(session, new, view)
            if spent.cancelled:
                return 130
            if question is not None:
                return answer_once(session, question, err, spent)
            from .chat.history import default_history_path
            from .ui.chat_input import make_reader
            from .ui.chat_repl import ChatRepl

            reader = make_reader(default_history_path().with_name("input_history"))
            ChatRepl(session, out, reader, read_document=partial(read_one_document, chat),
                     fit_fix=partial(fix_for, launch), on_exit=save).run()
            return 0
        finally:
            if question is not None:
                save()
