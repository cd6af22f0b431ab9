"""Log-probabilities from a position's raw logits (the model's own distribution, as OpenAI reports it)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from worker.engine.cpu_sampling import top_k
from worker.engine.outputs import TokenLogprob, TopLogprob


class Ranked:
    """One position's log-softmax normaliser and its k most likely tokens; read before any mask changes the
    logits (a mask only sets disallowed tokens to -inf, so an allowed token's logit is still the model's after)."""

    def __init__(self, logits: np.ndarray, k: int) -> None:
        top = logits.max()
        shifted = np.subtract(logits, top)  # float32 and in place after this copy: ~0.3 ms on a 128k vocabulary
        np.exp(shifted, out=shifted)
        self.log_z = float(top) + math.log(float(shifted.sum()))  # float32, pairwise: ~1e-7 relative
        self.top: list[tuple[int, float]] = []
        if k > 0:
            best = top_k(logits, k) if k < len(logits) else np.arange(len(logits))
            best = best[np.argsort(-logits[best], kind="stable")]
            self.top = [(int(t), float(logits[t]) - self.log_z) for t in best]

    def of(self, logits: np.ndarray, token: int, piece: Callable[[int], bytes]) -> TokenLogprob:
        return TokenLogprob(token, piece(token), float(logits[token]) - self.log_z,
                            tuple(TopLogprob(t, piece(t), lp) for t, lp in self.top))


class LogprobOf:
    """A sampled token's logprob, worked out when its text goes out (on a GPU, while the next step computes: the
    normaliser and the top k of a 128k vocabulary took 0.34 ms on an H200's host) from a copy of its position's
    logits, since nothing in it decides the next token."""

    __slots__ = ("logits", "k", "token", "piece")

    def __init__(self, logits: np.ndarray, k: int, token: int, piece: Callable[[int], bytes],
                 scale: float = 1.0) -> None:
        # a copy: llama.cpp's buffer is the next step's once that is queued. `scale`: what the row was divided by
        # (an in-graph chain's row is the logits at its temperature)
        self.logits = logits.copy() if scale == 1.0 else np.multiply(logits, np.float32(scale), dtype=np.float32)
        self.k = k
        self.token = token
        self.piece = piece

    def resolve(self) -> TokenLogprob:
        return Ranked(self.logits, self.k).of(self.logits, self.token, self.piece)


def resolved(logprobs: list[TokenLogprob | LogprobOf]) -> tuple[TokenLogprob, ...]:
    return tuple(lp.resolve() if isinstance(lp, LogprobOf) else lp for lp in logprobs)
