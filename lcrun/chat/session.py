"""A chat session: the conversation, the engine that holds its KV cache, and the rules between them — the prompt is
re-rendered each turn and the engine reuses the cached prefix, documents go before the turns and are prefilled when
added (only from where the new one goes) or dropped (again only from where it was), the oldest turns are dropped
(never the system prompt or a document) when the next turn would not fit, and every finished turn goes to the
history. No llama_cpp and no rich here: the engine comes in as a parameter, the UI consumes the events."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lcrun.atomic_files import write_atomic
from lcrun.documents import Document
from lcrun.engine.protocol import EngineProtocol
from lcrun.errors import DocumentError, LcrunError
from lcrun.generation.drive import generate, prefill
from lcrun.generation.records import Finished, GenerationParams, PrefillProgress, Request, TextChunk

from .conversation import Conversation, Fitted, Message, fit_to_context
from .history import History
from .documents import DocumentCheck, DocumentEntry, DocumentPrefilled, DocumentTooLong, document_message
from .prompt_tokens import PromptTokenizer, as_content
from .formats import FormatChoice, choose_format, engine_renderer, engine_vocabulary
from .template import ChatRenderer, TemplateError


class ContextFull(LcrunError):
    """A message or document that cannot fit even with every droppable turn gone."""


@dataclass(frozen=True)
class Notice:
    text: str
    level: str = "info"   # "info" | "warning"


@dataclass(frozen=True)
class TurnStarted:
    prompt_tokens: int     # the prompt as sent, after any drops
    n_ctx: int


ChatEvent = Notice | TurnStarted | PrefillProgress | TextChunk | Finished | DocumentPrefilled


@dataclass(frozen=True)
class ContextUsage:
    n_ctx: int
    system: int
    documents: list[tuple[str, int]]
    turns: int
    n_turns: int
    prompt: int            # the whole rendered prompt, as the next turn would send it (without a new question)
    cached: int            # tokens the engine holds in its KV cache now
    reserve: int           # kept free for the reply
    reply_header: int = 0  # what the template adds to start the reply (the generation prompt)

    @property
    def free(self) -> int:
        return max(self.n_ctx - self.prompt, 0)


@dataclass
class SessionStats:
    turns: int = 0
    prompt_tokens_evaluated: int = 0
    reused_tokens: int = 0
    completion_tokens: int = 0
    dropped_turns: int = 0
    last: Finished | None = None
    started_at: float = field(default_factory=time.time)


class ChatSession:
    def __init__(self, engine: EngineProtocol, *, chat_format: FormatChoice | None = None,
                 template: ChatRenderer | None = None, system: str | None = None,
                 params: GenerationParams = GenerationParams(), history: History | None = None, model_name: str = "",
                 session_path: Path | None = None, model_identity: str = "") -> None:
        """`chat_format`: as chosen from the file's header (default: chosen from the engine's vocabulary);
        `template`: a renderer to use instead (tests); `params`: how each reply is generated (its max_tokens is
        capped by the room the context leaves); `model_identity`: the model file's (lcrun.model_identity), saved
        with the session so that its KV cache is restored only into the same model."""
        self.engine = engine
        if template is None:
            chat_format = chat_format or choose_format(engine_vocabulary(engine))
            template = engine_renderer(engine, chat_format)
        self.chat_format = chat_format
        self.template = template
        self.conversation = Conversation(system or None)
        self.params = params
        self.history = history
        self.model_name = model_name
        self.session_path = session_path
        self.model_identity = model_identity
        self.loaded: dict[str, Any] = {}   # what a loaded session file says it was saved with
        self.stats = SessionStats()
        self.tokenize = PromptTokenizer(engine.tokenize, engine.token_text)

    # -- sizes --------------------------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def reserve(self) -> int:
        """Tokens kept free for the reply when fitting a prompt."""
        return min(self.params.max_tokens or 1024, max(16, self.n_ctx // 4))

    def count(self, text: str) -> int:
        return len(self.engine.tokenize(text))

    def _tokens(self, messages: list[Message] | None = None, *, add_generation_prompt: bool = True) -> list[int]:
        return self.tokenize(self.conversation.render(self.template, messages=messages,
                                                      add_generation_prompt=add_generation_prompt))

    # -- turns --------------------------------------------------------------------------------------------------
    def ask(self, text: str, cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
        self.conversation.messages.append(Message("user", text))
        try:
            fitted = self._fit()
        except (TemplateError, ContextFull):
            self.conversation.messages.pop()  # refused: as if it was never sent
            raise
        yield from self._reply(fitted, cancel, question=text, new_question=True)

    def retry(self, cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
        messages = self.conversation.messages
        while messages and messages[-1].role == "assistant":
            messages.pop()
        if not messages or messages[-1].role != "user" or messages[-1].pinned:
            raise LcrunError("/retry", "no question to answer again yet")
        sampling = self.params.sampling
        if sampling.temperature > 0:  # greedy would give the same answer; sampled replies get a new seed
            self.params = replace(self.params, sampling=replace(sampling, seed=sampling.seed + 1))
        yield from self._reply(self._fit(), cancel, question=messages[-1].content, new_question=False)

    def _fit(self) -> Fitted:
        fitted = fit_to_context(self.conversation, self.template, self.tokenize, self.n_ctx - self.reserve)
        if fitted is None:
            need = len(self._tokens())
            raise ContextFull("message", f"{need:,} tokens with the system prompt and documents, more than the "
                                         f"{self.n_ctx - self.reserve:,} the {self.n_ctx:,}-token context leaves "
                                         f"beside {self.reserve:,} for the reply; shorten it, or /clear documents")
        return fitted

    def _reply(self, fitted: Fitted, cancel: threading.Event | None, question: str,
               new_question: bool) -> Iterator[ChatEvent]:
        messages = self.conversation.messages
        if fitted.dropped_turns:
            self.stats.dropped_turns += fitted.dropped_turns
            yield Notice(f"context full: dropped the {fitted.dropped_turns} oldest turn(s) "
                         f"({fitted.dropped_tokens:,} tokens) to make room", "warning")
        room = self.n_ctx - len(fitted.tokens)
        params = replace(self.params, max_tokens=min(self.params.max_tokens or room, room))
        parts: list[str] = []
        finished: Finished | None = None
        yield TurnStarted(len(fitted.tokens), self.n_ctx)
        for event in generate(self.engine, Request(fitted.tokens, params), cancel=cancel):
            if isinstance(event, TextChunk):
                parts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
            yield event
        assert finished is not None
        reply = "".join(parts)
        if finished.reason == "cancelled" and not finished.completion_tokens:
            if new_question:
                messages.pop()  # stopped before the first token: as if the question was never sent
            yield Notice("cancelled before the reply started" + ("; the question was not kept" if new_question
                                                                  else ""))
            return
        messages.append(Message("assistant", reply, interrupted=finished.reason == "cancelled"))
        if finished.stop is None:  # the reply is its sampled tokens' text (unless a stop string cut it)
            sampled = list(finished.tokens)
            end = self.engine.token_text(sampled[-1]) if finished.reason == "stop" and sampled else ""
            self.tokenize.remember(fitted.text + as_content(reply) + end, fitted.tokens + sampled)
        if finished.reason == "length" and finished.completion_tokens >= room:
            yield Notice("the reply filled the context; the next turn drops the oldest turns", "warning")
        self._record(question, reply, finished)

    def _record(self, question: str, reply: str, finished: Finished) -> None:
        stats = self.stats
        stats.turns += 1
        stats.prompt_tokens_evaluated += finished.prompt_tokens - finished.reused_tokens
        stats.reused_tokens += finished.reused_tokens
        stats.completion_tokens += finished.completion_tokens
        stats.last = finished
        if self.history is not None:
            self.history.append({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": self.model_name,
                "system": self.conversation.system,
                "documents": [m.document for m in self.conversation.messages if m.pinned],
                "user": question, "assistant": reply, "finish_reason": finished.reason,
                "prompt_tokens": finished.prompt_tokens, "reused_tokens": finished.reused_tokens,
                "completion_tokens": finished.completion_tokens,
                "time_to_first_token_s": round(finished.time_to_first_token_s, 4),
                "gen_tokens_per_s": round(finished.gen_tokens_per_s, 2),
            })
        if self.session_path is not None:
            self.save(self.session_path)

    # -- documents ----------------------------------------------------------------------------------------------
    def _with_document(self, message: Message) -> Conversation:
        messages = list(self.conversation.messages)
        messages.insert(self.conversation.documents_end(), message)
        return Conversation(self.conversation.system, messages)

    def check_document(self, document: Document) -> DocumentCheck:
        """Measure a document read by lcrun.documents without adding it; refuse one that cannot fit at all."""
        trial = self._with_document(document_message(document))
        at = self.conversation.documents_end()
        # what it adds where it goes (the turns after it are tokenized again from their text, which can differ from
        # the tokens the model sampled: not the document's to count)
        adds = len(self.tokenize(trial.render(self.template, messages=trial.messages[: at + 1],
                                              add_generation_prompt=False))) - \
            len(self._tokens(self.conversation.messages[:at], add_generation_prompt=False))
        fitted = fit_to_context(trial, self.template, self.tokenize, self.n_ctx - self.reserve)
        if fitted is None:
            pinned = len(self.conversation.document_indices())
            held = f" and {pinned} document(s) already added" if pinned else ""
            with_it = len(self.tokenize(trial.render(self.template, messages=[m for m in trial.messages if m.pinned],
                                                     add_generation_prompt=False)))
            raise DocumentTooLong(document.name, f"{adds:,} tokens; the {self.n_ctx:,}-token context cannot hold it "
                                                 f"with the system prompt{held} and {self.reserve:,} tokens for a "
                                                 "reply (use a larger --ctx, a smaller KV type, or a shorter excerpt)",
                                  prompt_tokens=with_it, reserve=self.params.max_tokens or 1024)  # uncapped
        return DocumentCheck(document, adds, len(fitted.tokens), fitted.dropped_turns)

    def add_document(self, check: DocumentCheck, cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
        """Add a checked document after the documents already there, before the turns, and prefill it now — from
        where it goes: the cache before it is reused — so the next question costs only its own tokens. Cancelling
        the prefill, or a failure, leaves the conversation as it was."""
        saved = list(self.conversation.messages)
        self.conversation = self._with_document(document_message(check.document))
        fitted = fit_to_context(self.conversation, self.template, self.tokenize, self.n_ctx - self.reserve)
        if fitted is None:  # the conversation changed since the check
            self.conversation.messages[:] = saved
            raise DocumentError(check.document.name, "no longer fits the context")
        if fitted.dropped_turns:
            self.stats.dropped_turns += fitted.dropped_turns
            yield Notice(f"dropped the {fitted.dropped_turns} oldest turn(s) ({fitted.dropped_tokens:,} tokens) "
                         "to make room for the document", "warning")
        try:
            finished, seconds = yield from self._prefill(cancel)
        except BaseException:
            self.conversation.messages[:] = saved
            raise
        if finished is None or finished.reason == "cancelled":
            self.conversation.messages[:] = saved
            yield Notice(f"cancelled: {check.name} was not added")
            return
        yield DocumentPrefilled(check.name, check.tokens, finished.prompt_tokens - finished.reused_tokens, seconds)
        self._save_with_cache()

    def drop_document(self, number: int, cancel: threading.Event | None = None) -> Iterator[ChatEvent]:
        """Take document `number` (from 1, as /docs lists them) out of the conversation and bring the cache up to
        the conversation without it: what comes before it stays cached, only what followed it is evaluated again."""
        indices = self.conversation.document_indices()
        if not 1 <= number <= len(indices):
            have = f"1 to {len(indices)}" if indices else "none: /add one first"
            raise LcrunError("/drop", f"no document {number} (the documents are {have}; /docs lists them)")
        index = indices[number - 1]
        messages = self.conversation.messages
        took = len(self._tokens(messages[: index + 1], add_generation_prompt=False)) - \
            len(self._tokens(messages[:index], add_generation_prompt=False))
        message = messages.pop(index)
        finished, seconds = yield from self._prefill(cancel)
        evaluated = finished.prompt_tokens - finished.reused_tokens if finished is not None else 0
        yield DocumentPrefilled(message.document or "", took, evaluated, seconds, dropped=True)
        self._save_with_cache()

    def _prefill(self, cancel: threading.Event | None) -> Generator[ChatEvent, None, tuple[Finished | None, float]]:
        """Bring the cache to the conversation as it is now (no reply header): (its Finished, seconds)."""
        tokens = self._tokens(add_generation_prompt=False)
        finished: Finished | None = None
        started = time.perf_counter()
        if tokens:
            for event in prefill(self.engine, tokens, cancel=cancel):
                if isinstance(event, PrefillProgress):
                    yield event
                else:
                    finished = event
        return finished, time.perf_counter() - started

    def documents(self) -> list[DocumentEntry]:
        """The documents in the conversation, in order, with the tokens each takes in the prompt now."""
        pinned = [m for m in self.conversation.messages if m.pinned]
        counts = [tokens for _name, tokens in self.usage().documents]
        return [DocumentEntry(i, m.document or "", m.about, n) for i, (m, n) in enumerate(zip(pinned, counts), 1)]

    def _save_with_cache(self) -> None:
        if self.session_path is not None:
            self.save(self.session_path)
            self.engine.save_state(kv_state_path(self.session_path))

    # -- commands -----------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget turns and documents; keep the system prompt."""
        self.conversation.messages.clear()

    def set_system(self, text: str) -> None:
        self.conversation.system = text.strip() or None

    def usage(self) -> ContextUsage:
        """Each part as the difference it makes to the prompt (so the rows add up to it exactly)."""
        messages = self.conversation.messages
        previous = len(self._tokens([], add_generation_prompt=False))
        system, documents, turns = previous, [], 0
        for i, m in enumerate(messages):
            now = len(self._tokens(messages[: i + 1], add_generation_prompt=False))
            if m.pinned:
                documents.append((m.document or "", now - previous))
            else:
                turns += now - previous
            previous = now
        prompt = len(self._tokens())
        n_turns = sum(1 for m in messages if m.role == "user" and not m.pinned)
        return ContextUsage(self.n_ctx, system, documents, turns, n_turns, prompt, len(self.engine.cached_tokens),
                            self.reserve, reply_header=prompt - previous)

    # -- files --------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        data = {"lcrun_chat": 1, "model": self.model_name, "model_identity": self.model_identity, "n_ctx": self.n_ctx,
                **self.conversation.to_dict()}
        write_atomic(path, json.dumps(data, ensure_ascii=False, indent=1), make_parents=True)

    def kv_refusal(self) -> str | None:
        """Why the KV cache saved beside the loaded session cannot be restored here (another model — llama.cpp would
        take one of the same architecture and size and answer nonsense — or another context size); None if it can."""
        saved = self.loaded
        if saved.get("model_identity") != self.model_identity or not self.model_identity:
            return f"its KV cache was saved with another model ({saved.get('model') or 'unknown'})"
        if saved.get("n_ctx") != self.n_ctx:
            return f"its KV cache was saved with a {saved.get('n_ctx')}-token context, not {self.n_ctx:,}"
        return None

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("lcrun_chat") != 1:
                raise ValueError("not an lcrun chat file (saved with /save or --session)")
            conversation = Conversation.from_dict(data)
        except FileNotFoundError:
            raise LcrunError(str(path), "no such file") from None
        except OSError as exc:
            raise LcrunError(str(path), f"cannot be read ({exc.strerror or exc})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise LcrunError(str(path), f"not a saved chat: {exc}") from None
        self.conversation = conversation
        self.loaded = {key: data.get(key) for key in ("model", "model_identity", "n_ctx")}
        remove_stale_session_files(path)


def kv_state_path(session_path: Path) -> Path:
    return session_path.with_name(session_path.name + ".kv")


def remove_stale_session_files(path: Path) -> None:
    """`.partial` files of this session that a killed chat left: ours named by their writer (removed once it is
    gone), the KV state's (llama.cpp's writer names it `.kv.partial`) once an hour old."""
    import re

    from lcrun.process_files import remove_stale

    name = re.escape(path.name)
    remove_stale(path.parent, rf"{name}\.(\d+-\d+)\.partial", untagged=rf"{name}(?:\.kv)?\.partial")
