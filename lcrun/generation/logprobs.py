"""Log-probabilities of sampled tokens, as llama-server reports them: the full softmax of the raw logits the token
was drawn from (before penalties, grammar, top-k or temperature), so at temperature 0 the most likely token is the
one sampled. Each token is spelled as the reply's text spells it (`piece`: a control token is no text, unless the
request preserves it), so the sampled tokens' pieces make the reply."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .records import TokenLogprob


def token_logprob(logits: np.ndarray, token: int, top_n: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """`token`'s log-probability under `logits` and the `top_n` most likely tokens' (most likely first)."""
    peak = float(logits.max())
    log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float32).sum(dtype=np.float64)))
    top: tuple[tuple[int, bytes, float], ...] = ()
    if top_n:
        n = min(top_n, logits.size)
        best = np.argpartition(logits, logits.size - n)[logits.size - n:]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple((int(t), piece(int(t)), float(logits[t]) - log_total) for t in best)
    return TokenLogprob(token, piece(token), float(logits[token]) - log_total, top)
