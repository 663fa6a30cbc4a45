"""How many tokens documents take in a chat's prompt, before the model is loaded: the conversation rendered in the
model's chat format and tokenized exactly as the session will tokenize it (lcrun.chat.prompt_tokens), with any
tokenizer that has the engine's vocabulary API — the vocabulary loaded alone (lcrun.engine.vocab.VocabularyFile)
before loading, the engine after. A document's count is what it adds to the prompt: its `<document>` tag and the
template's turn around it included, so the counts add up to the prompt that is prefilled."""
from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .conversation import Conversation, Message
from .documents import document_message
from .formats import FormatChoice, engine_renderer
from .prompt_tokens import PromptTokenizer

if TYPE_CHECKING:
    from lcrun.documents import Document


@dataclass(frozen=True)
class PromptCount:
    documents: tuple[int, ...]   # what each new document adds to the prompt, in the order given
    starts: tuple[int, ...]      # the prompt position each new document starts at (where its prefill begins)
    prompt: int                  # the whole prompt: system, documents, conversation and, with a question, it and
                                 # the reply's header (without one: what is prefilled before the first question)
    fragments: Mapping[str, array] = field(default_factory=dict, repr=False)   # the documents' tokens, by text

    @property
    def document_tokens(self) -> int:
        return sum(self.documents)


def count_prompt(vocabulary: Any, chat_format: FormatChoice, documents: Sequence[Document], *,
                 system: str | None = None, messages: Sequence[Message] = (),
                 question: str | None = None) -> PromptCount:
    """The prompt of a chat that starts with `messages` (a restored session's) and gets `documents` added — each
    where the session puts it, after the documents before the first turn — then `question`, if any. `vocabulary`:
    tokenize/token_text/special_tokens/add_bos, as an engine has them."""
    renderer = engine_renderer(vocabulary, chat_format)
    tokenize = PromptTokenizer(vocabulary.tokenize, vocabulary.token_text)
    conversation = Conversation(system or None, list(messages))
    at = conversation.documents_end()
    for offset, document in enumerate(documents):
        conversation.messages.insert(at + offset, document_message(document))

    def length(upto: int) -> int:
        return len(tokenize(conversation.render(renderer, messages=conversation.messages[:upto],
                                                add_generation_prompt=False)))

    counts, starts = [], []
    before = length(at)
    for i in range(len(documents)):
        after = length(at + i + 1)
        counts.append(after - before)
        starts.append(before)
        before = after
    if question is not None:
        conversation.messages.append(Message("user", question))
    prompt = len(tokenize(conversation.render(renderer, add_generation_prompt=question is not None)))
    return PromptCount(tuple(counts), tuple(starts), prompt, tokenize.fragments())
