"""Log-probabilities of sampled tokens, as llama-server reports them: the full softmax of the raw logits the token
was drawn from (before penalties, grammar, top-k or temperature), so at temperature 0 the most likely token is the
one sampled. Control tokens are spelled out (an end of turn shows as its text, not as nothing)."""
from __future__ import annotations

import numpy as np

from lcrun.engine.protocol import EngineProtocol

from .records import TokenLogprob


def token_logprob(logits: np.ndarray, token: int, top_n: int, engine: EngineProtocol) -> TokenLogprob:
    """`token`'s log-probability under `logits` and the `top_n` most likely tokens' (most likely first)."""
    peak = float(logits.max())
    log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float32).sum(dtype=np.float64)))
    top: tuple[tuple[int, bytes, float], ...] = ()
    if top_n:
        n = min(top_n, logits.size)
        best = np.argpartition(logits, logits.size - n)[logits.size - n:]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple((int(t), piece(engine, int(t)), float(logits[t]) - log_total) for t in best)
    return TokenLogprob(token, piece(engine, token), float(logits[token]) - log_total, top)


def piece(engine: EngineProtocol, token: int) -> bytes:
    """A token's bytes; a control token's text where it has no bytes of its own."""
    return engine.token_bytes(token) or engine.token_text(token).encode("utf-8")
