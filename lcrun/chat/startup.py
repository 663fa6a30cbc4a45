"""`lcrun chat` around its session, without a screen: what the chat was asked for (`ChatOptions`), the prompt and
the documents read before anything loads, the session on a loaded model (its transcript, a `--session` restored,
saved on the way out). The command (lcrun.chat_cli) strings these together; ui/ shows what they return."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lcrun.errors import EngineError, LcrunError
from lcrun.generation.records import GenerationParams

if TYPE_CHECKING:
    from lcrun.documents import Document
    from lcrun.launch.loaded import LoadedModel

    from .conversation import Conversation
    from .session import ChatSession


@dataclass
class ChatOptions:
    prompt: str | None = None            # -p: answer this one prompt ("-": read it from stdin)
    system: str | None = None
    documents: list[str] = field(default_factory=list)   # -f: files, folders, URLs, "-" (stdin), in order
    include: tuple[str, ...] = ()        # --include/--exclude: globs for the files of a folder
    exclude: tuple[str, ...] = ()
    params: GenerationParams = GenerationParams()   # sampling, max_tokens, stop strings of every reply
    session_file: Path | None = None
    history_file: Path | None = None
    no_history: bool = False
    dry_run: bool = False


def read_question(options: ChatOptions) -> str | None:
    """-p's prompt (from stdin for `-p -`), None for the interactive chat; an empty one is refused."""
    if options.prompt is None:
        if "-" in options.documents and not options.dry_run:
            raise LcrunError("-f -", "standard input is the interactive chat's; give the document as a file, or ask "
                                     "one question with -p")
        return None
    if options.prompt == "-" and "-" in options.documents:
        raise LcrunError("-f -", "standard input is already the prompt (-p -); give the document as a file")
    text = sys.stdin.read() if options.prompt == "-" else options.prompt
    if not text.strip():
        raise LcrunError("-p", "the prompt is empty" + (" (nothing on stdin)" if options.prompt == "-" else ""))
    return text


def read_chat_documents(options: ChatOptions) -> list[Document]:
    """Every -f document, read now — before a download or a load, so a bad one costs nothing — in order."""
    if not options.documents:
        return []   # the readers (PDFium, trafilatura, …) are not even imported for a chat without documents
    from lcrun.documents import read_documents

    return read_documents(options.documents, include=options.include, exclude=options.exclude)


def read_one_document(options: ChatOptions, source: str) -> Document:
    """A document the interactive chat adds (/add), read as -f reads them."""
    from lcrun.documents import read_document

    if source == "-":
        raise LcrunError("/add -", "standard input is the chat's: give the document as a file, folder or URL")
    return read_document(source, include=options.include, exclude=options.exclude)


def peek_session(path: Path | None) -> tuple[Conversation, int] | None:
    """A --session file's conversation and context, read before the model loads (to size the context so that its
    KV cache can be restored); None when there is none or it does not read — restoring it says why, later."""
    from .conversation import Conversation

    if path is None or not path.is_file():
        return None
    try:
        if path.stat().st_size > 1 << 30:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        n_ctx = data.get("n_ctx") if isinstance(data, dict) else None
        if not isinstance(n_ctx, int) or data.get("lcrun_chat") != 1:
            return None
        return Conversation.from_dict(data), n_ctx
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None


def start_session(model: LoadedModel, options: ChatOptions) -> ChatSession:
    """The chat session on `model`, with its transcript (unless --no-history) and its system prompt."""
    from lcrun.model_identity import file_identity

    from .history import History, default_history_path
    from .session import ChatSession

    history = None if options.no_history else History(options.history_file or default_history_path())
    return ChatSession(model.engine, chat_format=model.chat_format, system=options.system, params=options.params,
                       history=history, model_name=model.model_path.name,
                       model_identity=file_identity(model.model_path), session_path=options.session_file)


@dataclass(frozen=True)
class Restored:
    messages: int
    kv_tokens: int                       # tokens of KV cache restored (0: the conversation will be prefilled)
    problem: str | None = None           # why the KV cache could not be restored


def restore_session(session: ChatSession, path: Path) -> Restored:
    """A saved --session: the conversation, and its KV cache when the state file beside it was saved by this model
    file at this context size (llama.cpp would take another model's of the same shape) and still loads."""
    from .session import kv_state_path

    session.load(path)
    kv = kv_state_path(path)
    restored, problem = 0, None
    refusal = session.kv_refusal() if kv.exists() else None
    if refusal is not None:
        problem = f"{path.name}: {refusal}"
    elif kv.exists():
        try:
            restored = session.engine.load_state(kv)
        except EngineError as exc:
            problem = str(exc)
    return Restored(len(session.conversation.messages), restored, problem)


def save_session(session: ChatSession, path: Path) -> int:
    """The conversation and its KV cache (llama.cpp's state file beside it); returns the tokens of KV saved."""
    from .session import kv_state_path

    session.save(path)
    session.engine.save_state(kv_state_path(path))
    return len(session.engine.cached_tokens)
