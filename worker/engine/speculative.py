"""Speculative decoding's policy: who proposes tokens, how many, and when to stop trying. Plain Python.

A speculating sequence decodes its last token and k proposed ones in the same llama_decode as everyone else's
tokens; the target model's own choice at each position is compared with the proposal, and the sequence keeps the
proposals up to the first miss plus the target's token there (llama.cpp's rule: sample the target at each position,
accept while it equals the proposal). Output is therefore the target's; only its speed changes.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class SpecConfig:
    n_max: int = 7  # proposals a step at most
    n_min: int = 1  # a shorter proposal is not worth the verification
    max_load: int = 4  # running + waiting jobs above which nobody speculates (decoding stops being memory-bound)
    ngram_max: int = 4  # the longest suffix looked up in the sequence's own tokens
    ngram_min: int = 3
    # Every proposal n_max long (a short one padded): on a GPU a step of a new shape is built and launched without
    # CUDA graphs until the shape has held for two steps, which costs more than verifying a few more tokens.
    fixed_length: bool = False


class NgramProposer:
    """Prompt lookup: the sequence's last few tokens found earlier in its own prompt and output; what followed
    them there is the proposal. Pays where output quotes its input: code edits, summaries, RAG answers."""

    def __init__(self, config: SpecConfig) -> None:
        self.config = config

    def propose(self, history: np.ndarray, n: int) -> list[int]:
        """Up to n tokens that followed the latest earlier occurrence of history's longest suffix (of ngram_max
        down to ngram_min tokens)."""
        size = len(history)
        for g in range(self.config.ngram_max, self.config.ngram_min - 1, -1):
            if size <= g:
                continue
            # every earlier window of g tokens at once (a view, no copy), compared with the last g tokens
            windows = sliding_window_view(history[: size - 1], g)
            hits = np.flatnonzero((windows == history[size - g :]).all(axis=1))
            hits = hits[hits < size - g]  # not the suffix itself
            if len(hits):
                start = int(hits[-1]) + g
                return [int(t) for t in history[start : start + n]]
        return []


@dataclass
class SlotSpeculation:
    """One job's speculation: its current proposal length, adapted to how much of it is accepted."""

    n: int  # proposals to ask for at the next step (0: off for now)
    proposed: int = 0
    accepted: int = 0
    pause: int = 0  # steps left without proposing, after a run of misses or while it does not pay
    misses: int = 0  # steps in a row that accepted nothing
    backoff: int = 4  # the pause after the cost gate last said no (doubled each time it says no in a row)
    recent_rate: float = 0.5  # accepted / proposed, recent steps weighing most

    def record(self, proposed: int, accepted: int, n_max: int, fixed_length: bool = False) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.recent_rate = 0.7 * self.recent_rate + 0.3 * accepted / proposed
        if accepted:
            self.backoff = 4
        if fixed_length:  # the length stays; misses in a row pause it
            self.misses = 0 if accepted else self.misses + 1
            if self.misses == 3:
                self.misses, self.pause = 0, 16
            return
        if accepted == proposed:
            self.n = min(n_max, self.n * 2)
        elif accepted == 0:
            self.n //= 2
            if self.n == 0:  # misses all the way down: rest a while, then try a short proposal again
                self.n, self.pause = 1, 16
        else:
            self.n = max(1, accepted + 1)

    @property
    def rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


class StepCosts:
    """What a decode step costs, and what each proposed token adds to it, as measured over the recent steps (medians:
    a step that reserved a new graph or waited on a busy neighbour is an outlier, not the rate). On a GPU an extra
    token is nearly free for a big model and not for a small one (CUDA graphs cover one-token steps only); on a CPU
    it costs nearly as much as the step (SmolLM2, 2 cores: 32 ms a step, ~8 ms a proposed token). A proposal pays
    where the tokens it is expected to add outweigh what it adds to everyone's step:
    `rate x step > per_token x running sequences`, whatever its length."""

    def __init__(self, window: int = 32) -> None:
        self._steps: collections.deque[float] = collections.deque(maxlen=window)
        self._per_token: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def step(self) -> float | None:
        return statistics.median(self._steps) if self._steps else None

    @property
    def per_token(self) -> float | None:
        return statistics.median(self._per_token) if self._per_token else None

    def record(self, seconds: float, drafted: int) -> None:
        if not drafted:
            self._steps.append(seconds)
        elif (step := self.step) is not None:
            self._per_token.append(max(0.0, seconds - step) / drafted)

    def worth(self, rate: float, running: int) -> bool:
        step, per_token = self.step, self.per_token
        if step is None or per_token is None:
            return True  # not measured yet: try
        return rate * step > 1.1 * per_token * running
