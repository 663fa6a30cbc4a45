"""`lcrun estimate MODEL --file DOC`: how many tokens the documents are for this model (its tokenizer fetched alone,
no weights), the context they need with an answer reserve, and per quant and KV type the memory that takes, whether
it fits here and the fix when it does not (context_fit)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .context_fit import ContextFit, fit_context
from .devices import Device
from .documents import Document
from .model_spec import ModelSpec


@dataclass(frozen=True)
class DocumentEstimate:
    documents: list[Document]
    tokens: list[int]              # each document's, as it enters the context
    fits: list[ContextFit]         # one per quant

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"documents": [d.to_dict(n) for d, n in zip(self.documents, self.tokens)],
                "tokens": self.total_tokens, "fits": [f.to_dict() for f in self.fits]}


def estimate_documents(model: str, spec: ModelSpec, documents: Sequence[Document], quants: Sequence[str],
                       devices: list[Device], *, kv_pairs: Sequence[tuple[str, str]] | None = None,
                       reserve: int, revision: str | None = None, hub_file: str | None = None,
                       **plan_options: Any) -> DocumentEstimate:
    """The documents (read by the caller, before anything was fetched) counted with MODEL's tokenizer, and the fit
    per quant."""
    from .documents.tokens import document_tokens
    from .model_vocab import open_vocabulary

    with open_vocabulary(model, spec=spec, revision=revision, hub_file=hub_file) as vocabulary:
        tokens = document_tokens(documents, vocabulary)
    total = sum(tokens)
    fits = [fit_context(spec, quant, devices, total, reserve=reserve, kv_types=kv_pairs, **plan_options)
            for quant in quants]
    return DocumentEstimate(list(documents), tokens, fits)
