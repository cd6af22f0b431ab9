"""Log-probabilities from a position's raw logits (the model's own distribution, as OpenAI reports it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from worker.engine.outputs import TokenLogprob, TopLogprob


class Ranked:
    """One position's log-softmax normaliser and its k most likely tokens; read before any mask changes the
    logits (a mask only sets disallowed tokens to -inf, so an allowed token's logit is still the model's after)."""

    def __init__(self, logits: np.ndarray, k: int) -> None:
        top = float(logits.max())
        self.log_z = top + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))
        if k > 0:
            best = np.argpartition(-logits, k - 1)[:k] if k < len(logits) else np.arange(len(logits))
            best = best[np.argsort(-logits[best], kind="stable")]
            self.top = [(int(t), float(logits[t]) - self.log_z) for t in best]
        else:
            self.top = []

    def of(self, logits: np.ndarray, token: int, piece: Callable[[int], bytes]) -> TokenLogprob:
        return TokenLogprob(token, piece(token), float(logits[token]) - self.log_z,
                            tuple(TopLogprob(t, piece(t), lp) for t, lp in self.top))
