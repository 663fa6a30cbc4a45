"""`lcrun chat` up to the plan: find the model, plan it, choose the chat format and show them (or only them,
--dry-run); then `chat_loaded` loads the engine and chats. Nothing here imports the engine or the session, so
--dry-run starts fast."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from lcrun.chat.documents import read_document
from lcrun.chat.formats import FormatChoice, choose_format, header_vocabulary
from lcrun.errors import LcrunError
from lcrun.generation.records import GenerationParams
from lcrun.launch import RunOverrides, plan_launch

from .chat_view import render_plan_panel
from .console import make_console
from .model_loading import locate_model


@dataclass
class ChatOptions:
    prompt: str | None = None
    system: str | None = None
    documents: list[Path] = field(default_factory=list)
    params: GenerationParams = GenerationParams()   # sampling, max_tokens, stop strings of every reply
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

    from .chat_loaded import chat_with_engine  # the session, the loop and their imports: not for --dry-run

    return chat_with_engine(launch, chat_format, options, question, out, err)


def _read_prompt(prompt: str | None) -> str:
    text = sys.stdin.read() if prompt == "-" else (prompt or "")
    if not text.strip():
        raise LcrunError("-p", "the prompt is empty" + (" (nothing on stdin)" if prompt == "-" else ""))
    return text
